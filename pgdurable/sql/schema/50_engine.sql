-- pgdurable schema, part 50: the worker protocol (every function a worker calls has
-- a _vN suffix so two service versions can share a database during a rolling deploy).
--
--   _claim_v2      lease up to N runnable tasks (FOR UPDATE SKIP LOCKED), oldest and newest
--   _claim_v1      the same for older packages' workers (rolling upgrades): not newer node types
--   _apply_v1      one checkpoint: fence, node writes, successor tasks, instance status, state
--   _apply_v2      the checkpoints of many instances, set-based (one call per batch)
--   _load_v2       an instance, its nodes and its named results in one call (the _load_*_v1
--                  three: older packages' workers)
--   _release_v1    give leased tasks back (shutdown, infrastructure errors)
--   _rescue_v1     clear expired leases (maintenance), bounded
--   _extend_v1     extend the leases of a worker's in-flight tasks (heartbeat)
--   _runner_*      the per-role step runner's text and its verification (docs/security.md)
--   _step_*        what a step transaction calls, behind the step capability
--
-- Only the service role calls the others; the step role gets EXECUTE on the _step_* ones.
-- Every function pins search_path to pg_catalog, pg_temp (pg_temp last: a session's temp
-- tables and types never shadow a catalog name) and names everything else with its schema;
-- operators are written operator(pg_catalog.x) where a step session may reach them.

-- Plans: a plpgsql statement with parameters is planned anew for each of a session's first
-- five calls (custom plans) and then for good only if its generic plan looks no dearer; the
-- claim's and the load's were planned on every call or for most calls (a pool spreads calls
-- over many sessions), and planning cost them as much as running. Their generic plans are
-- the same index scans (checked with auto_explain), so they take them from the first call.
--
-- Claim: lock candidate rows with SKIP LOCKED so concurrent workers of any number of
-- `serve` processes never wait on each other, and never take more than the free slots;
-- steps of an instance another worker is running steps of are left to that worker.
-- The lease is measured on the server clock (now()), due times on @engine@.clock() so
-- tests can move time for timers and schedules.
-- plpgsql, not sql, here and in the loads below: PostgreSQL before 18 plans a non-inlined SQL
-- function (one with a SET clause is never inlined) on every call, plpgsql once per session;
-- the claim's plan cost more than its execution.
-- Fairness: three quarters of a claim go to the longest-waiting tasks, a quarter to the most
-- recently due ones (a workflow started during a flood of 100,000, a signalled wait, a
-- successor of a running chain), so new work is picked up within a claim or two instead of
-- waiting behind the whole backlog (docs/reliability.md, "Floods"). The two picks lock what
-- they read; rows the oldest pick locked but did not take stay locked only until the claim's
-- transaction ends (it is this statement).
create function @engine@._claim_v2(p_owner text, p_limit integer, p_lease_seconds integer)
returns table (instance_id varchar, node_id varchar, gen integer, kind text, attempts integer,
               submitted_by regrole, database text, deadline timestamptz, clock timestamptz,
               state_version bigint)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
-- one plan per session (see "Plans" above)
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    -- the newest due tasks' share of the claim: a quarter (a claim of fewer than four takes
    -- one newest task a quarter of the time, so the expected share stays a quarter and the
    -- oldest are never starved)
    v_newest pg_catalog.int4 := case when p_limit >= 4 then p_limit / 4
                             when pg_catalog.random() < 0.25 then 1 else 0 end;
begin
    return query
    with newest as (
        select t.instance_id, t.node_id
        from @engine@.tasks t
        where t.lease_owner is null and t.due_at <= @engine@.clock()
          -- instance affinity: while another worker runs steps of an instance, its other
          -- runnable steps stay for that worker (it has the instance loaded, and two
          -- workers checkpointing one instance race and reload it); leases end, so a dead
          -- worker's instances come free with its leases
          -- (the checks are scalar sub-plans, one index probe each per candidate row: as NOT
          -- EXISTS they became anti-joins, which statistics of a table that grew since its
          -- last ANALYZE turned into a scan of every finished instance for every claim; the
          -- owner's two ranges probe tasks_owner_idx, where "<> p_owner" walked every task
          -- of the instance)
          and not coalesce((select true from @engine@.tasks o
                            where o.instance_id = t.instance_id and o.lease_owner < p_owner
                            limit 1), false)
          and not coalesce((select true from @engine@.tasks o
                            where o.instance_id = t.instance_id and o.lease_owner > p_owner
                            limit 1), false)
          -- a task of an instance its owner marked terminal (tenants may UPDATE status) is
          -- never claimed; the rescuer deletes it
          and not coalesce((select i.status in ('completed', 'failed', 'cancelled')
                            from df.instances i where i.id = t.instance_id), false)
        order by t.due_at desc
        limit v_newest
        for update skip locked
    ), oldest as (
        select t.instance_id, t.node_id, t.due_at
        from @engine@.tasks t
        where t.lease_owner is null and t.due_at <= @engine@.clock()
          -- instance affinity: while another worker runs steps of an instance, its other
          -- runnable steps stay for that worker (it has the instance loaded, and two
          -- workers checkpointing one instance race and reload it); leases end, so a dead
          -- worker's instances come free with its leases
          -- (the checks are scalar sub-plans, one index probe each per candidate row: as NOT
          -- EXISTS they became anti-joins, which statistics of a table that grew since its
          -- last ANALYZE turned into a scan of every finished instance for every claim; the
          -- owner's two ranges probe tasks_owner_idx, where "<> p_owner" walked every task
          -- of the instance)
          and not coalesce((select true from @engine@.tasks o
                            where o.instance_id = t.instance_id and o.lease_owner < p_owner
                            limit 1), false)
          and not coalesce((select true from @engine@.tasks o
                            where o.instance_id = t.instance_id and o.lease_owner > p_owner
                            limit 1), false)
          -- a task of an instance its owner marked terminal (tenants may UPDATE status) is
          -- never claimed; the rescuer deletes it
          and not coalesce((select i.status in ('completed', 'failed', 'cancelled')
                            from df.instances i where i.id = t.instance_id), false)
        order by t.due_at
        limit p_limit
        for update skip locked
    ), picked as (
        select n.instance_id, n.node_id from newest n
        union all
        (select o.instance_id, o.node_id from oldest o
         where not exists (select 1 from newest n
                           where n.instance_id = o.instance_id and n.node_id = o.node_id)
         order by o.due_at
         limit p_limit - (select count(*) from newest))
    )
    update @engine@.tasks t
    set lease_owner = p_owner,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        attempts = t.attempts + 1
    from picked
    where t.instance_id = picked.instance_id and t.node_id = picked.node_id
    returning t.instance_id, t.node_id, t.gen, t.kind, t.attempts, t.submitted_by, t.database,
              t.deadline, @engine@.clock(),
              -- the instance's checkpoint counter: a worker whose cached copy is older
              -- reloads before substituting results into the step
              (select r.state_version from @engine@.runs r where r.instance_id = t.instance_id);
end
$$;

-- _claim_v1 is what workers of older packages call during a rolling upgrade: the same claim,
-- without instances whose node types they may not know.
create function @engine@._claim_v1(p_owner text, p_limit integer, p_lease_seconds integer)
returns table (instance_id varchar, node_id varchar, gen integer, kind text, attempts integer,
               submitted_by regrole, database text, deadline timestamptz, clock timestamptz,
               state_version bigint)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    -- the newest due tasks' share of the claim: a quarter (a claim of fewer than four takes
    -- one newest task a quarter of the time, so the expected share stays a quarter and the
    -- oldest are never starved)
    v_newest pg_catalog.int4 := case when p_limit >= 4 then p_limit / 4
                             when pg_catalog.random() < 0.25 then 1 else 0 end;
begin
    return query
    with newest as (
        select t.instance_id, t.node_id
        from @engine@.tasks t
        where t.lease_owner is null and t.due_at <= @engine@.clock()
          -- instance affinity: while another worker runs steps of an instance, its other
          -- runnable steps stay for that worker (it has the instance loaded, and two
          -- workers checkpointing one instance race and reload it); leases end, so a dead
          -- worker's instances come free with its leases
          -- (both checks are scalar sub-plans, one index probe per candidate row: as NOT
          -- EXISTS they became anti-joins, which statistics of a table that grew since its
          -- last ANALYZE turned into a scan of every finished instance for every claim)
          and not coalesce((select true from @engine@.tasks o
                            where o.instance_id = t.instance_id and o.lease_owner is not null
                              and o.lease_owner <> p_owner
                            limit 1), false)
          -- a task of an instance its owner marked terminal (tenants may UPDATE status) is
          -- never claimed; the rescuer deletes it
          and not coalesce((select i.status in ('completed', 'failed', 'cancelled')
                            from df.instances i where i.id = t.instance_id), false)
          -- an older package's worker (it calls _claim_v1) never takes an instance with a
          -- node type it may not know: df.retry's RETRY (schema 5) and df.foreach's FOREACH
          -- (schema 6) wait for a worker of this package (docs/operating.md, "Rolling
          -- upgrade"); nodes_newer_types_idx makes this one probe
          and not coalesce((select true from df.nodes n
                            where n.instance_id = t.instance_id
                              and n.node_type in ('RETRY', 'FOREACH')
                            limit 1), false)
        order by t.due_at desc
        limit v_newest
        for update skip locked
    ), oldest as (
        select t.instance_id, t.node_id, t.due_at
        from @engine@.tasks t
        where t.lease_owner is null and t.due_at <= @engine@.clock()
          -- instance affinity: while another worker runs steps of an instance, its other
          -- runnable steps stay for that worker (it has the instance loaded, and two
          -- workers checkpointing one instance race and reload it); leases end, so a dead
          -- worker's instances come free with its leases
          -- (both checks are scalar sub-plans, one index probe per candidate row: as NOT
          -- EXISTS they became anti-joins, which statistics of a table that grew since its
          -- last ANALYZE turned into a scan of every finished instance for every claim)
          and not coalesce((select true from @engine@.tasks o
                            where o.instance_id = t.instance_id and o.lease_owner is not null
                              and o.lease_owner <> p_owner
                            limit 1), false)
          -- a task of an instance its owner marked terminal (tenants may UPDATE status) is
          -- never claimed; the rescuer deletes it
          and not coalesce((select i.status in ('completed', 'failed', 'cancelled')
                            from df.instances i where i.id = t.instance_id), false)
          -- an older package's worker (it calls _claim_v1) never takes an instance with a
          -- node type it may not know: df.retry's RETRY (schema 5) and df.foreach's FOREACH
          -- (schema 6) wait for a worker of this package (docs/operating.md, "Rolling
          -- upgrade"); nodes_newer_types_idx makes this one probe
          and not coalesce((select true from df.nodes n
                            where n.instance_id = t.instance_id
                              and n.node_type in ('RETRY', 'FOREACH')
                            limit 1), false)
        order by t.due_at
        limit p_limit
        for update skip locked
    ), picked as (
        select n.instance_id, n.node_id from newest n
        union all
        (select o.instance_id, o.node_id from oldest o
         where not exists (select 1 from newest n
                           where n.instance_id = o.instance_id and n.node_id = o.node_id)
         order by o.due_at
         limit p_limit - (select count(*) from newest))
    )
    update @engine@.tasks t
    set lease_owner = p_owner,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        attempts = t.attempts + 1
    from picked
    where t.instance_id = picked.instance_id and t.node_id = picked.node_id
    returning t.instance_id, t.node_id, t.gen, t.kind, t.attempts, t.submitted_by, t.database,
              t.deadline, @engine@.clock(),
              -- the instance's checkpoint counter: a worker whose cached copy is older
              -- reloads before substituting results into the step
              (select r.state_version from @engine@.runs r where r.instance_id = t.instance_id);
end
$$;

-- One checkpoint of one instance. Returns the new state_version, or
--   -1  stale: state_version moved on since the worker loaded it (reload and recompute;
--       nothing was written, the caller's transaction can retry);
--   -2  fenced: the task is no longer ours (lease lost/rescued, abandoned, instance terminal
--       or cancelled) — the caller must roll back everything, including a step's own SQL;
--   -3  busy: the checkpoint must change the instance's row and someone else holds a lock on
--       it (its owner may: tenants hold UPDATE (status) on their instances); nothing was
--       written, try again later. Never waits on a lock a tenant can take.
-- Lock order: the runs row first (serialises all checkpoints of one instance across every
-- worker), then tasks, nodes, instances — every writer of an instance takes runs first
-- (df.cancel's helper does too), so checkpoints cannot deadlock each other.
create function @engine@._apply_v1(
    p_owner text, p_instance varchar, p_task_node varchar, p_task_gen integer,
    p_expected_version bigint, p_state bytea, p_inst_status text, p_nodes jsonb,
    p_new_tasks jsonb, p_drop_tasks text[], p_named jsonb, p_lease_seconds integer)
returns bigint
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_version pg_catalog.int8;
    v_status  pg_catalog.text;
    v_dropped pg_catalog.text[];
begin
    select r.state_version into v_version
    from @engine@.runs r where r.instance_id = p_instance
    for update;
    if not found then
        return -2;
    end if;
    select i.status into v_status from df.instances i where i.id = p_instance;
    if v_status is null or v_status in ('completed', 'failed', 'cancelled') then
        return -2;
    end if;
    if v_version <> p_expected_version then
        return -1;
    end if;
    if p_inst_status is not null then
        perform 1 from df.instances i where i.id = p_instance for update skip locked;
        if not found then
            return -3;
        end if;
    end if;
    if p_task_node is not null then
        delete from @engine@.tasks t
        where t.instance_id = p_instance and t.node_id = p_task_node
          and t.lease_owner = p_owner and t.gen = p_task_gen;
        if not found then
            return -2;
        end if;
    end if;

    -- abandoned leaves (RACE losers, failed JOIN siblings, break): drop their tasks and tell
    -- the worker running one of them to cancel its statement
    if p_drop_tasks is not null and cardinality(p_drop_tasks) > 0 then
        with d as (
            delete from @engine@.tasks t
            where t.instance_id = p_instance and t.node_id = any (p_drop_tasks)
            returning t.node_id, t.lease_owner
        )
        select array_agg(d.node_id) into v_dropped from d where d.lease_owner is not null;
        if v_dropped is not null then
            -- no payload: a channel tells a listener nothing (any role may LISTEN); the
            -- workers look up which of their running steps are no longer theirs
            perform pg_catalog.pg_notify('pgdurable_abandon', '');
        end if;
    end if;

    if p_nodes is not null then
        update df.nodes n
        -- an entry without a status only merges details (e.g. a LOOP's iteration stamp)
        set status = coalesce(u.status, n.status),
            result = case when u.status is null then n.result
                          when u.status in ('completed', 'failed') then u.result end,
            status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb) || coalesce(u.details, '{}'::pg_catalog.jsonb)
                || coalesce(case when u.status in ('completed', 'failed')
                                  and u.details ? 'finished_at' then
                    jsonb_build_object('duration_ms', round(1000 * extract(epoch from
                        (u.details ->> 'finished_at')::pg_catalog.timestamptz
                        - coalesce(u.details ->> 'started_at',
                                   n.status_details ->> 'started_at')::pg_catalog.timestamptz))) end,
                            '{}'::pg_catalog.jsonb),
            updated_at = now()
        from jsonb_to_recordset(p_nodes) as u(id pg_catalog.varchar, status pg_catalog.text, result pg_catalog.jsonb, details pg_catalog.jsonb)
        where n.instance_id = p_instance and n.id = u.id;
    end if;

    if p_new_tasks is not null then
        -- "take": the successor is handed straight to a free slot of this worker (ARCHITECTURE.md §7, hand-off):
        -- inserted already leased to it, so no NOTIFY and no claim round trip. If the worker
        -- dies before running it, the lease expires and the rescuer frees it like any other.
        insert into @engine@.tasks as t (instance_id, node_id, gen, kind, due_at, deadline,
                                          submitted_by, database, lease_owner, lease_expires_at,
                                          attempts)
        select p_instance, n.node_id, n.gen, n.kind,
               coalesce(n.due_at, @engine@.clock() + make_interval(secs => coalesce(n.delay, 0))),
               n.deadline, i.submitted_by, i.database,
               case when n.take then p_owner end,
               case when n.take then now() + make_interval(secs => p_lease_seconds) end,
               case when n.take then 1 else 0 end
        from jsonb_to_recordset(p_new_tasks)
                 as n(node_id pg_catalog.varchar, gen pg_catalog.int4, kind pg_catalog.text,
                      due_at pg_catalog.timestamptz, delay pg_catalog.float8,
                      deadline pg_catalog.timestamptz, take pg_catalog.bool)
        cross join df.instances i
        where i.id = p_instance
        on conflict (instance_id, node_id) do update
            set gen = excluded.gen, kind = excluded.kind, due_at = excluded.due_at,
                deadline = excluded.deadline, lease_owner = excluded.lease_owner,
                lease_expires_at = excluded.lease_expires_at, attempts = excluded.attempts;
        if exists (select 1 from jsonb_to_recordset(p_new_tasks) as n(take pg_catalog.bool)
                   where n.take is not true) then
            perform pg_catalog.pg_notify('pgdurable_work', '');
        end if;
    end if;

    if p_named is not null then
        insert into @engine@.results as r (instance_id, name, value, seq)
        select p_instance, e.key, e.value, v_version + 1 from jsonb_each(p_named) e
        on conflict (instance_id, name) do update set value = excluded.value, seq = excluded.seq;
    end if;

    if p_inst_status is not null then
        update df.instances i
        set status = p_inst_status,
            updated_at = now(),
            -- the time it ended, for every terminal status (pg_durable sets it on completed
            -- only; a DBA asks when a failed run failed too: docs/api.md)
            completed_at = case when p_inst_status in ('completed', 'failed', 'cancelled')
                                then now() else i.completed_at end
        where i.id = p_instance;
        if p_inst_status in ('completed', 'failed', 'cancelled') then
            delete from @engine@.tasks t where t.instance_id = p_instance;
        end if;
        -- a failed or cancelled instance keeps its named results and unconsumed signals
        -- until it is pruned: df.restart (70_restart.sql) goes on with them
        if p_inst_status = 'completed' then
            delete from @engine@.signals s where s.instance_id = p_instance;
            delete from @engine@.results r where r.instance_id = p_instance;
        end if;
    end if;

    update @engine@.runs r
    set state = p_state, state_version = r.state_version + 1
    where r.instance_id = p_instance;
    return v_version + 1;
end
$$;

create function @engine@._release_v1(p_owner text, p_instance varchar, p_node varchar)
returns void
language sql volatile
set search_path = pg_catalog, pg_temp
as $$
    -- one task given back after an error backs off with its attempts (0.1 s doubling, at
    -- most 30 s), so a task that keeps failing cannot spin a worker; a shutdown (NULL
    -- instance) gives everything back as it is
    update @engine@.tasks t
    set lease_owner = null, lease_expires_at = null,
        due_at = case when p_instance is null then t.due_at
                      else greatest(t.due_at, @engine@.clock() + make_interval(
                               secs => least(30, 0.1 * power(2, least(t.attempts, 10))))) end
    where t.lease_owner = p_owner
      and (p_instance is null or (t.instance_id = p_instance and t.node_id = p_node))
$$;

-- Bounded sweep of expired leases: a step whose worker died (or was paused past its lease)
-- becomes claimable again; the old owner's late checkpoint is fenced by _apply_v1.
create function @engine@._rescue_v1(p_limit integer)
returns integer
language sql volatile
set search_path = pg_catalog, pg_temp
as $$
    with expired as (
        select t.instance_id, t.node_id
        from @engine@.tasks t
        where t.lease_owner is not null and t.lease_expires_at < now()
        limit p_limit
        for update skip locked
    ), upd as (
        update @engine@.tasks t
        set lease_owner = null, lease_expires_at = null
        from expired e
        where t.instance_id = e.instance_id and t.node_id = e.node_id
        returning 1
    ), orphaned as (
        -- tasks of instances their owner marked terminal, or whose instance row is gone
        select t.instance_id, t.node_id
        from @engine@.tasks t
        left join df.instances i on i.id = t.instance_id
        where t.lease_owner is null
          and (i.id is null or i.status in ('completed', 'failed', 'cancelled'))
        limit p_limit
        for update of t skip locked
    ), dropped as (
        delete from @engine@.tasks t using orphaned o
        where t.instance_id = o.instance_id and t.node_id = o.node_id
        returning 1
    )
    select (pg_catalog.count(*) + (select pg_catalog.count(*) from dropped))::pg_catalog.int4 from upd
$$;

-- Only the tasks the worker is really running are extended: a task it lost track of must
-- expire and be rescued.
create function @engine@._extend_v1(p_owner text, p_lease_seconds integer,
                                    p_instances text[], p_nodes text[])
returns integer
language sql volatile
set search_path = pg_catalog, pg_temp
as $$
    -- SKIP LOCKED: a task row locked right now is being checkpointed (its lease ends with
    -- that transaction); waiting for it while holding the rows already extended could
    -- close a deadlock with a batch of steps that checkpoints those rows next
    with mine as (
        select t.instance_id, t.node_id
        from @engine@.tasks t
        join unnest(p_instances, p_nodes) as k(instance_id, node_id)
          on t.instance_id = k.instance_id and t.node_id = k.node_id
        where t.lease_owner = p_owner
        for update of t skip locked
    ), upd as (
        update @engine@.tasks t
        set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        from mine
        where t.instance_id = mine.instance_id and t.node_id = mine.node_id
        returning 1
    )
    select pg_catalog.count(*)::pg_catalog.int4 from upd
$$;

-- The runner: a SECURITY DEFINER function owned by the submitting role, so a step's statement
-- runs as that role and cannot leave it (PostgreSQL refuses SET ROLE / SET SESSION
-- AUTHORIZATION inside a definer call). It lives in @engine@_exec, where no tenant has USAGE
-- or CREATE: a tenant owns its runner but cannot name, alter or replace it. It is created by
-- df.grant_usage (run by an administrator), never by the service. Its body:
--   1. refuses a caller without this backend's step capability (@engine@.step_caps): code a
--      tenant leaves to run at COMMIT, as the unprivileged step role, cannot call it;
--   2. runs the statement and counts result bytes as rows arrive: an oversized result fails
--      the step before it is all read (the worker's memory stays bounded);
--   3. fires the deferred constraint triggers the statement queued, now, as the role
--      (SET CONSTRAINTS ALL IMMEDIATE), and refuses a WITH HOLD cursor (materialised at COMMIT):
--      what would otherwise run at COMMIT, outside the runner, runs inside it or not at all.
-- Everything it names is schema-qualified; it does not pin search_path, so the statement
-- sees the session's usual one ("$user" is the submitting role inside the call).
create function @engine@._runner_body_v1()
returns text
language sql immutable
set search_path = pg_catalog, pg_temp
as $f$
    select $body$
declare
    r record;
    v_row pg_catalog.json;
    v_bytes pg_catalog.int8 := 0;
    v_count pg_catalog.int8;
begin
    perform @engine@._cap_check_v1(p_cap);
    begin
        for r in execute p_sql loop
            v_row := pg_catalog.to_json(r);
            v_bytes := v_bytes operator(pg_catalog.+) pg_catalog.octet_length(v_row::pg_catalog.text);
            if v_bytes operator(pg_catalog.>) p_max_bytes then
                raise exception 'step result is over the limit of % bytes', p_max_bytes
                    using errcode = '54000',
                          hint = 'return fewer or smaller rows, or raise serve''s --result-max-bytes';
            end if;
            return next v_row;
        end loop;
    exception when invalid_cursor_definition then
        if pg_catalog.strpos(sqlerrm, 'multi-query') operator(pg_catalog.>) 0 then
            raise exception 'a workflow SQL step must be exactly one statement'
                using errcode = '42601',
                      hint = 'split it into several steps joined with ~>';
        end if;
        execute p_sql;
        -- a statement without result rows (DML without RETURNING, DDL, CALL): how many rows
        -- it processed, as a bare JSON number (a result row is always an object)
        get diagnostics v_count = row_count;
        return next pg_catalog.to_json(v_count);
    end;
    set constraints all immediate;
    if exists (select 1 from pg_catalog.pg_cursors c where c.is_holdable) then
        raise exception 'a workflow step may not leave a WITH HOLD cursor open'
            using errcode = '0A000';
    end if;
end
$body$::pg_catalog.text
$f$;

-- The runner body of schema version 3 (before the row count of statements without result
-- rows): runners made then stay valid (_runner_ok_v1) until df.grant_usage re-makes them; the
-- worker reads both. Frozen: never edit.
create function @engine@._runner_body_schema3_v1()
returns text
language sql immutable
set search_path = pg_catalog, pg_temp
as $f$
    select $body$
declare
    r record;
    v_row pg_catalog.json;
    v_bytes pg_catalog.int8 := 0;
begin
    perform @engine@._cap_check_v1(p_cap);
    begin
        for r in execute p_sql loop
            v_row := pg_catalog.to_json(r);
            v_bytes := v_bytes operator(pg_catalog.+) pg_catalog.octet_length(v_row::pg_catalog.text);
            if v_bytes operator(pg_catalog.>) p_max_bytes then
                raise exception 'step result is over the limit of % bytes', p_max_bytes
                    using errcode = '54000',
                          hint = 'return fewer or smaller rows, or raise serve''s --result-max-bytes';
            end if;
            return next v_row;
        end loop;
    exception when invalid_cursor_definition then
        if pg_catalog.strpos(sqlerrm, 'multi-query') operator(pg_catalog.>) 0 then
            raise exception 'a workflow SQL step must be exactly one statement'
                using errcode = '42601',
                      hint = 'split it into several steps joined with ~>';
        end if;
        execute p_sql;
    end;
    set constraints all immediate;
    if exists (select 1 from pg_catalog.pg_cursors c where c.is_holdable) then
        raise exception 'a workflow step may not leave a WITH HOLD cursor open'
            using errcode = '0A000';
    end if;
end
$body$::pg_catalog.text
$f$;

-- The CREATE FUNCTION of a role's runner in a schema (df.grant_usage runs it as the role).
create function @engine@._runner_ddl_v1(p_role regrole, p_schema text)
returns text
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.format(
        'create or replace function %I.%I(p_cap pg_catalog.text, p_sql pg_catalog.text, '
        'p_max_bytes pg_catalog.int8) returns setof pg_catalog.json '
        'language plpgsql volatile security definer as %L',
        p_schema, 'step_' || p_role::pg_catalog.oid::pg_catalog.text, @engine@._runner_body_v1())
$$;

-- Is the role's runner the one the engine made: in @engine@_exec (owned by the engine's
-- owner), owned by the role, SECURITY DEFINER, plpgsql, with exactly the engine's body, and
-- no SET clause? The worker checks before it first calls a role's runner (here and in a
-- `database =>` target); anything else fails the step instead of running it.
create function @engine@._runner_ok_v1(p_role oid)
returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.count(*) operator(pg_catalog.=) 1
    from pg_catalog.pg_proc p
    join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) p.pronamespace
    join pg_catalog.pg_language l on l.oid operator(pg_catalog.=) p.prolang
    where n.nspname operator(pg_catalog.=) '@engine@_exec'
      and n.nspowner operator(pg_catalog.=) (select c.relowner from pg_catalog.pg_class c
                                              where c.oid operator(pg_catalog.=) '@engine@.tasks'::pg_catalog.regclass)
      and p.proname operator(pg_catalog.=) ('step_' || p_role::pg_catalog.text)
      and p.proowner operator(pg_catalog.=) p_role
      and p.prosecdef and p.proconfig is null
      and l.lanname operator(pg_catalog.=) 'plpgsql'
      and p.prosrc operator(pg_catalog.=) any (array[@engine@._runner_body_v1(),
                                                       @engine@._runner_body_schema3_v1()])
      and pg_catalog.pg_get_function_identity_arguments(p.oid) operator(pg_catalog.=)
          'p_cap text, p_sql text, p_max_bytes bigint'
$$;

-- The next-step runner: a batch's later step in one call (docs/performance.md, "Session 12").
-- A second function per role, made with the runner by df.grant_usage and like it in every
-- way that matters to security (in @engine@_exec, owned by the role, SECURITY DEFINER, no
-- SET clause, EXECUTE for the step role only, the capability checked before anything else),
-- whose body does all that @engine@._step_next_v1 does around the runner's call: RESET ALL,
-- the settings the batch's first step applied, the statement (as the runner runs it), the
-- statement_timeout armed again and search_path pinned again for the worker's next
-- statement, the check of the statements the worker prepared, and the result's size as the
-- worker stores it. The worker prepares its call once per batch and binds it for each later
-- step; so a later step costs one function call rather than step_next's, its dynamic
-- EXECUTE (parsed and planned at every step) and the runner's call inside it. A role whose
-- next-step runner is missing (made before it existed) or does not verify runs its later
-- steps through step_next and its runner, as before.
-- The code after the statement runs as the role, as the statement did: it reads nothing the
-- role could not, and every name in it is qualified, operators too.
create function @engine@._runner_next_body_v1()
returns text
language sql immutable
set search_path = pg_catalog, pg_temp
as $f$
    select $body$
declare
    r       record;
    v_row   pg_catalog.json;
    v_first pg_catalog.json;
    v_n     pg_catalog.int8 := 0;
    v_bytes pg_catalog.int8 := 0;
    v_count pg_catalog.int8;
begin
    perform @engine@._cap_check_v1(p_cap);
    reset all;
    perform pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    perform pg_catalog.set_config(s.k, s.v, true)
    from rows from (pg_catalog.unnest(p_names), pg_catalog.unnest(p_vals)) as s(k, v);
    perform pg_catalog.set_config('df.in_workflow', 'true', true),
            pg_catalog.set_config('statement_timeout', p_timeout, true),
            pg_catalog.set_config('application_name', p_app, true);
    perform pg_catalog.set_config('search_path', p_path, true);
    begin
        for r in execute p_sql loop
            v_row := pg_catalog.to_json(r);
            v_n := v_n operator(pg_catalog.+) 1::pg_catalog.int8;
            v_bytes := v_bytes operator(pg_catalog.+) pg_catalog.octet_length(v_row::pg_catalog.text);
            if v_bytes operator(pg_catalog.>) p_max_bytes then
                raise exception 'step result is over the limit of % bytes', p_max_bytes
                    using errcode = '54000',
                          hint = 'return fewer or smaller rows, or raise serve''s --result-max-bytes';
            end if;
            if v_first is null then
                v_first := v_row;
            end if;
            return next v_row;
        end loop;
    exception when invalid_cursor_definition then
        if pg_catalog.strpos(sqlerrm, 'multi-query') operator(pg_catalog.>) 0 then
            raise exception 'a workflow SQL step must be exactly one statement'
                using errcode = '42601',
                      hint = 'split it into several steps joined with ~>';
        end if;
        execute p_sql;
        -- a statement without result rows (DML without RETURNING, DDL, CALL): how many rows
        -- it processed, as a bare JSON number (a result row is always an object)
        get diagnostics v_count = row_count;
        return next pg_catalog.to_json(v_count);
    end;
    set constraints all immediate;
    if exists (select 1 from pg_catalog.pg_cursors c where c.is_holdable) then
        raise exception 'a workflow step may not leave a WITH HOLD cursor open'
            using errcode = '0A000';
    end if;
    perform pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true),
            pg_catalog.set_config('statement_timeout', p_timeout, true);
    if p_stmts is not null and (
        select pg_catalog.count(*) from pg_catalog.pg_prepared_statements p
        where not p.from_sql and p.name operator(pg_catalog.=) any (p_stmts))
        operator(pg_catalog.<>) pg_catalog.cardinality(p_stmts) then
        raise exception 'a workflow step may not deallocate the statements the worker prepared in its session'
            using errcode = '0A000',
                  hint = 'a step''s statement may PREPARE and DEALLOCATE its own statements, not the worker''s';
    end if;
    if v_n operator(pg_catalog.>) 0 and pg_catalog.json_typeof(v_first) operator(pg_catalog.=) 'object' then
        v_bytes := v_bytes operator(pg_catalog.+) v_n operator(pg_catalog.+) 35
                   operator(pg_catalog.+) pg_catalog.length(v_n::pg_catalog.text);
        if v_bytes operator(pg_catalog.+) pg_catalog.octet_length(v_first::pg_catalog.text)
           operator(pg_catalog.>=) p_max_bytes then
            begin
                v_bytes := v_bytes operator(pg_catalog.+) coalesce((
                    select pg_catalog.sum(pg_catalog.octet_length(pg_catalog.to_json(k.k)::pg_catalog.text)
                                          operator(pg_catalog.+) 1)
                    from (select distinct j.k from pg_catalog.json_object_keys(v_first) as j(k)) as k), 0);
            exception when others then
                null;
            end;
        end if;
        if v_bytes operator(pg_catalog.>) p_max_bytes then
            raise exception 'step result is % bytes, over the limit of % bytes', v_bytes, p_max_bytes
                using errcode = '54000',
                      hint = 'return fewer or smaller rows, or raise serve''s --result-max-bytes';
        end if;
    end if;
end
$body$::pg_catalog.text
$f$;

-- The CREATE FUNCTION of a role's next-step runner in a schema (df.grant_usage runs it as the
-- role, with the runner's).
create function @engine@._runner_next_ddl_v1(p_role regrole, p_schema text)
returns text
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.format(
        'create or replace function %I.%I(p_names pg_catalog.text[], p_vals pg_catalog.text[], '
        'p_path pg_catalog.text, p_timeout pg_catalog.text, p_app pg_catalog.text, '
        'p_cap pg_catalog.text, p_sql pg_catalog.text, p_max_bytes pg_catalog.int8, '
        'p_stmts pg_catalog.text[]) returns setof pg_catalog.json '
        'language plpgsql volatile security definer as %L',
        p_schema, 'next_' || p_role::pg_catalog.oid::pg_catalog.text, @engine@._runner_next_body_v1())
$$;

-- Is the role's next-step runner the one the engine made (as _runner_ok_v1 asks of the
-- runner)? The worker asks before it binds a role's later steps to it; when not, they run
-- through @engine@._step_next_v1 and the runner.
create function @engine@._runner_next_ok_v1(p_role oid)
returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.count(*) operator(pg_catalog.=) 1
    from pg_catalog.pg_proc p
    join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) p.pronamespace
    join pg_catalog.pg_language l on l.oid operator(pg_catalog.=) p.prolang
    where n.nspname operator(pg_catalog.=) '@engine@_exec'
      and n.nspowner operator(pg_catalog.=) (select c.relowner from pg_catalog.pg_class c
                                              where c.oid operator(pg_catalog.=) '@engine@.tasks'::pg_catalog.regclass)
      and p.proname operator(pg_catalog.=) ('next_' || p_role::pg_catalog.text)
      and p.proowner operator(pg_catalog.=) p_role
      and p.prosecdef and p.proconfig is null
      and l.lanname operator(pg_catalog.=) 'plpgsql'
      and p.prosrc operator(pg_catalog.=) @engine@._runner_next_body_v1()
      and pg_catalog.pg_get_function_identity_arguments(p.oid) operator(pg_catalog.=)
          'p_names text[], p_vals text[], p_path text, p_timeout text, p_app text, p_cap text, p_sql text, p_max_bytes bigint, p_stmts text[]'
$$;

create function @engine@._heartbeat_v1(p_worker_id text, p_kind text, p_host text, p_pid integer,
                                       p_version text, p_in_flight integer)
returns void
language sql volatile
set search_path = pg_catalog, pg_temp
as $$
    insert into @engine@.workers as w (worker_id, kind, host, pid, version, in_flight)
    values (p_worker_id, p_kind, p_host, p_pid, p_version, p_in_flight)
    on conflict (worker_id) do update
        set last_seen_at = now(), in_flight = excluded.in_flight;
    -- forget processes silent for a minute (crashed hosts); live ones re-insert themselves
    delete from @engine@.workers w where w.last_seen_at < pg_catalog.now() - '60 seconds'::pg_catalog.interval;
    -- and the step capabilities of connections that are gone
    delete from @engine@.step_caps c
    where not exists (select 1 from pg_catalog.pg_stat_activity a where a.pid = c.pid);
$$;

-- Caps on connections running step SQL (docs/decisions.md D13): each slot is a row of @engine@.step_slots
-- (and, per role, of @engine@.role_slots) locked by the step's own transaction, so the
-- commit/rollback that ends the step releases it, even when the worker dies:
--   pg_durable.max_user_connections (default 10): deployment-wide;
--   pg_durable.max_connections_per_role (default 0 = no per-role cap): per submitting role,
--     so one tenant cannot take every slot.
-- Rows, not advisory locks: only the engine's owner can lock them (a tenant holds no
-- privilege on these tables), so no connected role can take the slots away from the steps.
-- Waits (on one taken slot at a time, 100 ms each) up to pg_durable.execution_acquire_timeout
-- seconds, then fails the step. Not callable by anyone but the engine (_step_begin_v1).
-- The three settings are deployment-wide (setting_db): read fresh for every step.
create function @engine@._step_slot_v1(p_role oid)
returns integer
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set lock_timeout = '100ms'
as $$
declare
    v_max      pg_catalog.int4 := greatest(1, @engine@._setting_int_v1(
                   'pg_durable.max_user_connections',
                   @engine@.setting_db('max_user_connections', '10')));
    v_role_max pg_catalog.int4 := @engine@._setting_int_v1('pg_durable.max_connections_per_role',
                   @engine@.setting_db('max_connections_per_role', '0'));
    v_timeout  pg_catalog.int4 := @engine@._setting_int_v1('pg_durable.execution_acquire_timeout',
                   @engine@.setting_db('execution_acquire_timeout', '30'));
    v_deadline pg_catalog.timestamptz := pg_catalog.clock_timestamp()
                   operator(pg_catalog.+) pg_catalog.make_interval(secs => v_timeout);
    v_start    pg_catalog.int4 := pg_catalog.floor(pg_catalog.random() * v_max)::pg_catalog.int4;
    v_got      pg_catalog.int4;
    v_role_ok  pg_catalog.bool := v_role_max operator(pg_catalog.<=) 0;
begin
    -- the slot rows are made by the service (_slots_ensure_v1), never here: rows a step's
    -- transaction inserted would stay locked by it, every slot taken, until it ends
    loop
        if not v_role_ok then
            perform 1 from @engine@.role_slots s
            where s.role operator(pg_catalog.=) p_role and s.slot operator(pg_catalog.<) v_role_max
            limit 1
            for update skip locked;
            v_role_ok := found;
        end if;
        if v_role_ok then
            select s.slot into v_got from @engine@.step_slots s
            where s.slot operator(pg_catalog.<) v_max
            order by (s.slot operator(pg_catalog.-) v_start operator(pg_catalog.+) v_max)
                     operator(pg_catalog.%) v_max
            limit 1
            for update skip locked;
            if found then
                return v_got;
            end if;
        end if;
        if pg_catalog.clock_timestamp() operator(pg_catalog.>=) v_deadline then
            if not v_role_ok then
                raise exception 'connection limit reached: all max_connections_per_role=% step '
                                'slots of role % stayed busy for execution_acquire_timeout=%s',
                                v_role_max, p_role::pg_catalog.regrole, v_timeout
                    using errcode = '53300',
                          hint = 'raise pg_durable.max_connections_per_role or lower the fan-out';
            end if;
            raise exception 'connection limit reached: all max_user_connections=% step slots '
                            'stayed busy for execution_acquire_timeout=%s', v_max, v_timeout
                using errcode = '53300',
                      hint = 'raise pg_durable.max_user_connections or lower the fan-out';
        end if;
        if v_role_ok then
            -- every slot is taken: wait on one (woken the moment its holder ends, not after a
            -- fixed sleep), at most lock_timeout, then look at all of them again
            begin
                perform 1 from @engine@.step_slots s where s.slot operator(pg_catalog.=) v_start
                for update;
                return v_start;
            exception when lock_not_available then
                v_start := (v_start operator(pg_catalog.+) 1) operator(pg_catalog.%) v_max;
            end;
        else
            perform pg_catalog.pg_sleep(0.05);
        end if;
    end loop;
end
$$;

-- The step slot rows up to the current settings (they change at run time): all of
-- max_user_connections, and max_connections_per_role for every role with work queued.
-- Called by the service at start, in maintenance, and when it starts an instance. The
-- settings are deployment-wide (setting_db), read fresh.
create function @engine@._slots_ensure_v1(p_role oid)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_max      pg_catalog.int4 := greatest(1, @engine@._setting_int_v1(
                   'pg_durable.max_user_connections',
                   @engine@.setting_db('max_user_connections', '10')));
    v_role_max pg_catalog.int4 := @engine@._setting_int_v1('pg_durable.max_connections_per_role',
                   @engine@.setting_db('max_connections_per_role', '0'));
begin
    insert into @engine@.step_slots (slot)
    select g from pg_catalog.generate_series(0, v_max - 1) g
    on conflict do nothing;
    -- 'new'-mode launch slots (@engine@._new_start_v1); 16 are made at install
    insert into @engine@.locks (name)
    select 'launch:' || g
    from pg_catalog.generate_series(0, greatest(1, @engine@._setting_int_v1(
             'pg_durable.max_new_transaction_starts',
             @engine@.setting_db('max_new_transaction_starts', '2'))) - 1) g
    on conflict do nothing;
    if v_role_max > 0 then
        insert into @engine@.role_slots (role, slot)
        select r.role, g
        from (select p_role as role where p_role is not null
              union
              select distinct t.submitted_by::pg_catalog.oid from @engine@.tasks t
              where p_role is null) r
        cross join pg_catalog.generate_series(0, v_role_max - 1) g
        on conflict do nothing;
    end if;
end
$$;

-- Retention (docs/reliability.md): terminal instances older than pg_durable.retention_days are pruned in
-- bounded batches; pending/running work is never touched. One worker at a time (the 'prune'
-- row of @engine@.locks, skipped when another holds it) so batches do not fight.
create function @engine@._prune_v1(p_limit integer)
returns integer
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_days pg_catalog.int4 := @engine@._setting_int_v1('pg_durable.retention_days',
                                  @engine@.setting_db('retention_days', '30'));
    v_n    pg_catalog.int4;
begin
    if v_days operator(pg_catalog.<=) 0 then
        return 0;
    end if;
    perform 1 from @engine@.locks l where l.name operator(pg_catalog.=) 'prune'
    for update skip locked;
    if not found then
        return 0;
    end if;
    with old as (
        select i.id from df.instances i
        where i.status operator(pg_catalog.=) any ('{completed,failed,cancelled}'::pg_catalog.text[])
          and i.updated_at operator(pg_catalog.<) (pg_catalog.now()
              operator(pg_catalog.-) pg_catalog.make_interval(days => v_days))
        order by i.updated_at
        limit p_limit
        for update skip locked
    ), gone as (
        delete from df.instances i using old where i.id operator(pg_catalog.=) old.id
        returning i.id
    ), runs as (
        delete from @engine@.runs r using gone where r.instance_id operator(pg_catalog.=) gone.id
        returning 1
    ), named as (
        -- what a failed or cancelled instance kept for df.restart, and its run history
        delete from @engine@.results r using gone where r.instance_id operator(pg_catalog.=) gone.id
        returning 1
    ), inbox as (
        delete from @engine@.signals s using gone where s.instance_id operator(pg_catalog.=) gone.id
        returning 1
    ), history as (
        delete from @engine@.run_history h using gone where h.instance_id operator(pg_catalog.=) gone.id
        returning 1
    )
    select pg_catalog.count(*)::pg_catalog.int4 into v_n from gone;
    return v_n;
end
$$;

------------------------------------------------------------------------------------------
-- the step session (docs/security.md): token-gated, called by the unprivileged step role
------------------------------------------------------------------------------------------

-- Register a step connection's capability (the service, when it opens the connection).
create function @engine@._cap_grant_v1(p_pid integer, p_token_hash bytea, p_worker text)
returns void
language sql volatile
set search_path = pg_catalog, pg_temp
as $$
    insert into @engine@.step_caps as c (pid, token_hash, worker_id)
    values (p_pid, p_token_hash, p_worker)
    on conflict (pid) do update
        set token_hash = excluded.token_hash, worker_id = excluded.worker_id,
            created_at = pg_catalog.now()
$$;

-- Raise unless p_cap is this backend's step capability. EXECUTE is PUBLIC (a runner calls it
-- as its owning tenant): it answers nothing but "yes" or an error, and the token is 128
-- random bits.
create function @engine@._cap_check_v1(p_cap text)
returns void
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_cap is null or not exists (
        select 1 from @engine@.step_caps c
        where c.pid operator(pg_catalog.=) pg_catalog.pg_backend_pid()
          and c.token_hash operator(pg_catalog.=)
              pg_catalog.sha256(pg_catalog.convert_to(p_cap, 'UTF8'))) then
        raise exception 'not a pgdurable step session: missing or wrong step capability'
            using errcode = '42501';
    end if;
end
$$;

-- RESET ALL as a function, so that it joins the next step's one statement (step_next,
-- pgdurable/sql/queries.sql): every setting the last step set, for its session or its
-- transaction, goes back to the session's default (search_path included, which step_next
-- sets again right after). It changes nothing but its caller's own settings: the step role
-- may run it without a capability.
create function @engine@._step_reset_v1()
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    reset all;
end
$$;

-- The next step of a batch in one call (step_next, pgdurable/sql/queries.sql): RESET ALL, the
-- settings the batch's first step applied (step_settings returned them), then the role's
-- runner (@engine@_exec.step_<role>, the one df.grant_usage made and the worker verified). A
-- function so that its statements are planned once per session: as one top-level statement
-- it was parsed and planned for every step, a third of PostgreSQL's CPU per chained step.
-- SECURITY INVOKER and callable by the step role without a capability: it calls a runner as
-- the session could itself, and the runner checks the capability.
-- RESET ALL resets search_path too; it is pinned again at once (the function's SET clause
-- also restores the caller's on return). The role's search_path applies from just before the
-- runner's call to the end of its rows: every name parsed meanwhile is qualified, operators
-- too. Once the runner's rows are all out, statement_timeout is set again for the caller's
-- next statement, whatever the step set meanwhile (a limit is armed when a statement begins,
-- not when it is set). The role's other settings never name search_path or a name set here
-- (_setting_pinned_v1).
-- Last, the step's result as the worker stores it (its rows, their count and their columns:
-- pgdurable/values.py, sql_envelope) must fit in p_max_bytes: the runner counts the rows
-- alone. Checked here, so that a refused result fails its own statement: the worker sends a
-- batch's next steps in one round trip, and a result it refused itself, after the steps
-- behind it ran, would roll the whole batch back (docs/performance.md, "Session 10").
create function @engine@._step_next_v1(p_names text[], p_vals text[], p_path text,
                                       p_timeout text, p_app text, p_role oid, p_cap text,
                                       p_sql text, p_max_bytes bigint, p_stmts text[])
returns setof pg_catalog.json
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_row   pg_catalog.json;
    v_first pg_catalog.json;
    v_n     pg_catalog.int8 := 0;
    v_bytes pg_catalog.int8 := 0;
begin
    reset all;
    perform pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    perform pg_catalog.set_config(s.k, s.v, true)
    from rows from (pg_catalog.unnest(p_names), pg_catalog.unnest(p_vals)) as s(k, v);
    perform pg_catalog.set_config('df.in_workflow', 'true', true),
            pg_catalog.set_config('statement_timeout', p_timeout, true),
            pg_catalog.set_config('application_name', p_app, true);
    perform pg_catalog.set_config('search_path', p_path, true);
    for v_row in execute pg_catalog.format('select r.* from %I.%I($1, $2, $3) as r',
            '@engine@_exec', 'step_' operator(pg_catalog.||) p_role::pg_catalog.text)
            using p_cap, p_sql, p_max_bytes loop
        v_n := v_n operator(pg_catalog.+) 1::pg_catalog.int8;
        v_bytes := v_bytes operator(pg_catalog.+)
                   pg_catalog.octet_length(v_row::pg_catalog.text)::pg_catalog.int8;
        if v_first is null then
            v_first := v_row;
        end if;
        return next v_row;
    end loop;
    perform pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true),
            pg_catalog.set_config('statement_timeout', p_timeout, true);
    -- the statements the worker prepared on this session for the batch's next round trips
    -- (p_stmts; pgdurable/worker/wave.py, Statements): the step's statement may DEALLOCATE
    -- and PREPARE in this session, and one that took any of them away (to put its own in
    -- their place: a SQL PREPARE shows as from_sql) fails here, so that PostgreSQL skips
    -- the rest of the round trip and no statement of the tenant's runs in their place
    if p_stmts is not null and (
        select pg_catalog.count(*) from pg_catalog.pg_prepared_statements p
        where not p.from_sql and p.name operator(pg_catalog.=) any (p_stmts))
        operator(pg_catalog.<>) pg_catalog.cardinality(p_stmts) then
        raise exception 'a workflow step may not deallocate the statements the worker prepared in its session'
            using errcode = '0A000',
                  hint = 'a step''s statement may PREPARE and DEALLOCATE its own statements, not the worker''s';
    end if;
    -- {"rows":[…],"row_count":n,"columns":[…]}: the rows and the commas between them, 37 bytes,
    -- the count's digits and the first row's keys (a statement without result rows sends one
    -- bare number: its envelope is small). The keys are read only when they could matter
    -- (they are fewer bytes than the row that holds them), and a row PostgreSQL cannot read
    -- them from (a json string holding \u0000) is left to the worker, which refuses it saying so.
    if v_n operator(pg_catalog.>) 0 and pg_catalog.json_typeof(v_first) operator(pg_catalog.=) 'object' then
        v_bytes := v_bytes operator(pg_catalog.+) v_n operator(pg_catalog.+) 35
                   operator(pg_catalog.+) pg_catalog.length(v_n::pg_catalog.text);
        if v_bytes operator(pg_catalog.+) pg_catalog.octet_length(v_first::pg_catalog.text)
           operator(pg_catalog.>=) p_max_bytes then
            begin
                v_bytes := v_bytes operator(pg_catalog.+) coalesce((
                    select pg_catalog.sum(pg_catalog.octet_length(pg_catalog.to_json(k.k)::pg_catalog.text)
                                          operator(pg_catalog.+) 1)
                    from (select distinct j.k from pg_catalog.json_object_keys(v_first) as j(k)) as k), 0);
            exception when others then
                null;
            end;
        end if;
        -- all rows read and the envelope counted: the size the worker would have stored (as
        -- PostgreSQL renders the rows), so the message is the worker's own check's
        if v_bytes operator(pg_catalog.>) p_max_bytes then
            raise exception 'step result is % bytes, over the limit of % bytes', v_bytes, p_max_bytes
                using errcode = '54000',
                      hint = 'return fewer or smaller rows, or raise serve''s --result-max-bytes';
        end if;
    end if;
end
$$;

-- The start of a step transaction: the capability, one step slot, and the step's identity
-- for @engine@._invoker() (the row is stamped with this transaction's id).
create function @engine@._step_begin_v1(p_cap text, p_role oid)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_slot pg_catalog.int4;
begin
    perform @engine@._cap_check_v1(p_cap);
    v_slot := @engine@._step_slot_v1(p_role);
    insert into @engine@.step_sessions as s (pid, xid, role)
    values (pg_catalog.pg_backend_pid(), pg_catalog.txid_current(), p_role)
    on conflict (pid) do update set xid = excluded.xid, role = excluded.role;
    return v_slot;
end
$$;

-- What a worker reads to load an instance: its row, the engine's data and the submitting
-- role as the worker must check it before starting the instance (docs/api.md "NULL arguments"); last the role's
-- own pg_durable.loop_min_interval_ms / loop_max_iterations (ALTER ROLE … SET, as text, NULL
-- when it has none): the worker combines them with the deployment's, a role's value only
-- tightening them (pgdurable/worker/instance.py, loop_limits).
create function @engine@._load_instance_v1(p_instance varchar)
returns table (label text, status text, role_oid oid, role_text text, database text,
               root_node varchar, vars jsonb, state bytea, state_version bigint,
               cancel_reason text, rolname name, rolsuper boolean, rolcanlogin boolean,
               superuser_ok boolean, role_loop_min_interval_ms text,
               role_loop_max_iterations text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    return query
    select i.label, i.status, i.submitted_by::pg_catalog.oid, i.submitted_by::pg_catalog.text,
           i.database, i.root_node, r.vars, r.state, r.state_version, r.cancel_reason,
           ro.rolname, ro.rolsuper, ro.rolcanlogin,
           coalesce(@engine@.setting_db('enable_superuser_instances', 'off')
                    operator(pg_catalog.=) any ('{on,true,1}'::pg_catalog.text[]), false),
           @engine@._role_setting_v1(i.submitted_by::pg_catalog.oid,
                                     'pg_durable.loop_min_interval_ms'),
           @engine@._role_setting_v1(i.submitted_by::pg_catalog.oid,
                                     'pg_durable.loop_max_iterations')
    from df.instances i
    join @engine@.runs r on r.instance_id operator(pg_catalog.=) i.id
    left join pg_catalog.pg_roles ro on ro.oid operator(pg_catalog.=) i.submitted_by::pg_catalog.oid
    where i.id operator(pg_catalog.=) p_instance;
end
$$;

create function @engine@._load_nodes_v1(p_instance varchar)
returns table (id varchar, node_type text, query text, result_name text, left_node varchar,
               right_node varchar, status text, result jsonb, status_details jsonb)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    return query
    select n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           n.result, n.status_details
    from df.nodes n where n.instance_id operator(pg_catalog.=) p_instance;
end
$$;

create function @engine@._load_results_v1(p_instance varchar)
returns table (name text, value jsonb)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    return query
    select r.name, r.value from @engine@.results r
    where r.instance_id operator(pg_catalog.=) p_instance
    order by r.seq;
end
$$;

-- What _load_instance_v1, _load_nodes_v1 and _load_results_v1 return, in one call (a worker
-- loads an instance at its start and after a conflict: one statement instead of three, each
-- ~50-70 us of the worker's Python; pgdurable/worker/cache.py), read in one snapshot. Rows, so
-- that each value is decoded as the three decode it (a json aggregate would be parsed whole,
-- and again whole with exact numbers when any value holds a fraction): first the instance's
-- (kind 0: _load_instance_v1's columns, none when there is no such instance), then one per
-- node (kind 1: _load_nodes_v1's columns, status as node_status), then one per named result
-- in the order they were produced (kind 2: name in result_name, value in result); the
-- columns another kind has are NULL.
-- The role's and the database's settings come from one pg_db_role_setting scan (setting_db and
-- two _role_setting_v1 calls made three, each a function call with its own SET clause): the
-- same values, by the same rules: enable_superuser_instances the database's default, else
-- the server's; each loop limit the role's value in this database first, else its own.
create function @engine@._load_v2(p_instance varchar)
returns table (kind integer, label text, status text, role_oid oid, role_text text,
               database text, root_node varchar, vars jsonb, state bytea, state_version bigint,
               cancel_reason text, rolname name, rolsuper boolean, rolcanlogin boolean,
               superuser_ok boolean, role_loop_min_interval_ms text,
               role_loop_max_iterations text, node_id varchar, node_type text, query text,
               result_name text, left_node varchar, right_node varchar, node_status text,
               result jsonb, status_details jsonb)
language plpgsql stable
set search_path = pg_catalog, pg_temp
-- one plan per session (see "Plans" above _claim_v2)
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
begin
    return query
    select 0, i.label, i.status, i.submitted_by::pg_catalog.oid, i.submitted_by::pg_catalog.text,
           i.database, i.root_node, r.vars, r.state, r.state_version, r.cancel_reason,
           ro.rolname, ro.rolsuper, ro.rolcanlogin,
           coalesce(st.superuser_db,
                    nullif(pg_catalog.current_setting('pg_durable.enable_superuser_instances',
                                                      true), ''),
                    'off') operator(pg_catalog.=) any ('{on,true,1}'::pg_catalog.text[]),
           st.loop_min_interval_ms, st.loop_max_iterations,
           null::pg_catalog.varchar, null::pg_catalog.text, null::pg_catalog.text,
           null::pg_catalog.text, null::pg_catalog.varchar, null::pg_catalog.varchar,
           null::pg_catalog.text, null::pg_catalog.jsonb, null::pg_catalog.jsonb
    from df.instances i
    join @engine@.runs r on r.instance_id operator(pg_catalog.=) i.id
    left join pg_catalog.pg_roles ro on ro.oid operator(pg_catalog.=) i.submitted_by::pg_catalog.oid
    cross join lateral (
        -- setting_db: the database's own default (no role), its first item of the name
        select (pg_catalog.array_agg(nullif(x.value, '')) filter (
                    where x.setrole operator(pg_catalog.=) 0::pg_catalog.oid
                      and x.setdatabase operator(pg_catalog.<>) 0::pg_catalog.oid
                      and x.name operator(pg_catalog.=) 'pg_durable.enable_superuser_instances'
                ))[1] as superuser_db,
               -- _role_setting_v1: the role's, this database's first
               (pg_catalog.array_agg(x.value
                    order by x.setdatabase operator(pg_catalog.=) 0::pg_catalog.oid) filter (
                    where x.setrole operator(pg_catalog.=) i.submitted_by::pg_catalog.oid
                      and x.name operator(pg_catalog.=) 'pg_durable.loop_min_interval_ms'
                ))[1] as loop_min_interval_ms,
               (pg_catalog.array_agg(x.value
                    order by x.setdatabase operator(pg_catalog.=) 0::pg_catalog.oid) filter (
                    where x.setrole operator(pg_catalog.=) i.submitted_by::pg_catalog.oid
                      and x.name operator(pg_catalog.=) 'pg_durable.loop_max_iterations'
                ))[1] as loop_max_iterations
        from (select s.setrole, s.setdatabase,
                     pg_catalog.lower(pg_catalog.split_part(c.item, '=', 1)) as name,
                     pg_catalog.substr(c.item,
                                       pg_catalog.strpos(c.item, '=') operator(pg_catalog.+) 1)
                         as value
              from pg_catalog.pg_db_role_setting s
              cross join lateral pg_catalog.unnest(s.setconfig) as c(item)
              where s.setrole operator(pg_catalog.=)
                        any (array[0::pg_catalog.oid, i.submitted_by::pg_catalog.oid])
                and s.setdatabase operator(pg_catalog.=) any (array[0::pg_catalog.oid,
                        (select d.oid from pg_catalog.pg_database d
                         where d.datname operator(pg_catalog.=) pg_catalog.current_database())])
             ) x
        where x.name operator(pg_catalog.=) any (array['pg_durable.enable_superuser_instances',
                                                       'pg_durable.loop_min_interval_ms',
                                                       'pg_durable.loop_max_iterations'])
    ) st
    where i.id operator(pg_catalog.=) p_instance;
    if not found then
        return;
    end if;
    return query
    select 1, null::pg_catalog.text, null::pg_catalog.text, null::pg_catalog.oid,
           null::pg_catalog.text, null::pg_catalog.text, null::pg_catalog.varchar,
           null::pg_catalog.jsonb, null::pg_catalog.bytea, null::pg_catalog.int8,
           null::pg_catalog.text, null::pg_catalog.name, null::pg_catalog.bool,
           null::pg_catalog.bool, null::pg_catalog.bool, null::pg_catalog.text,
           null::pg_catalog.text,
           n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           n.result, n.status_details
    from df.nodes n where n.instance_id operator(pg_catalog.=) p_instance;
    return query
    select 2, null::pg_catalog.text, null::pg_catalog.text, null::pg_catalog.oid,
           null::pg_catalog.text, null::pg_catalog.text, null::pg_catalog.varchar,
           null::pg_catalog.jsonb, null::pg_catalog.bytea, null::pg_catalog.int8,
           null::pg_catalog.text, null::pg_catalog.name, null::pg_catalog.bool,
           null::pg_catalog.bool, null::pg_catalog.bool, null::pg_catalog.text,
           null::pg_catalog.text,
           null::pg_catalog.varchar, null::pg_catalog.text, null::pg_catalog.text, x.name,
           null::pg_catalog.varchar, null::pg_catalog.varchar, null::pg_catalog.text, x.value,
           null::pg_catalog.jsonb
    from @engine@.results x
    where x.instance_id operator(pg_catalog.=) p_instance
    order by x.seq;
end
$$;

-- The same reads and the checkpoint from inside a step transaction, behind the capability.
create function @engine@._step_load_instance_v1(p_cap text, p_instance varchar)
returns table (label text, status text, role_oid oid, role_text text, database text,
               root_node varchar, vars jsonb, state bytea, state_version bigint,
               cancel_reason text, rolname name, rolsuper boolean, rolcanlogin boolean,
               superuser_ok boolean, role_loop_min_interval_ms text,
               role_loop_max_iterations text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    return query select * from @engine@._load_instance_v1(p_instance);
end
$$;

create function @engine@._step_load_nodes_v1(p_cap text, p_instance varchar)
returns table (id varchar, node_type text, query text, result_name text, left_node varchar,
               right_node varchar, status text, result jsonb, status_details jsonb)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    return query select * from @engine@._load_nodes_v1(p_instance);
end
$$;

create function @engine@._step_load_results_v1(p_cap text, p_instance varchar)
returns table (name text, value jsonb)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    return query select * from @engine@._load_results_v1(p_instance);
end
$$;

create function @engine@._step_load_v2(p_cap text, p_instance varchar)
returns table (kind integer, label text, status text, role_oid oid, role_text text,
               database text, root_node varchar, vars jsonb, state bytea, state_version bigint,
               cancel_reason text, rolname name, rolsuper boolean, rolcanlogin boolean,
               superuser_ok boolean, role_loop_min_interval_ms text,
               role_loop_max_iterations text, node_id varchar, node_type text, query text,
               result_name text, left_node varchar, right_node varchar, node_status text,
               result jsonb, status_details jsonb)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    return query select * from @engine@._load_v2(p_instance);
end
$$;

create function @engine@._step_lock_run_v1(p_cap text, p_instance varchar)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    perform 1 from @engine@.runs r where r.instance_id operator(pg_catalog.=) p_instance
    for update;
end
$$;

create function @engine@._step_apply_v1(
    p_cap text, p_owner text, p_instance varchar, p_task_node varchar, p_task_gen integer,
    p_expected_version bigint, p_state bytea, p_inst_status text, p_nodes jsonb,
    p_new_tasks jsonb, p_drop_tasks text[], p_named jsonb, p_lease_seconds integer)
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    return @engine@._apply_v1(p_owner, p_instance, p_task_node, p_task_gen, p_expected_version,
                              p_state, p_inst_status, p_nodes, p_new_tasks, p_drop_tasks,
                              p_named, p_lease_seconds);
end
$$;

-- Set-based checkpoints (docs/performance.md "The checkpoint"): one call writes the
-- checkpoints of many instances, each statement once for the whole set rather than once per
-- step (a batch of SQL steps, the completer's group commit). One element per instance (the
-- worker merges the checkpoints a batch made of one instance into one: p_counts of them):
--   p_ids, p_versions, p_counts, p_statuses, p_states  the instance, the state_version the
--       worker computed on, how many checkpoints it carries, the new instance status (NULL:
--       unchanged) and the scheduler state after the last one;
--   p_fence_ids/_nodes/_gens  the tasks it consumes (leased to p_owner), any number per
--       instance; p_drop_ids/_nodes  abandoned leaves whose tasks go;
--   p_nodes, p_new_tasks, p_named  as _apply_v1's, each element naming its instance ("i");
--       a node or a successor task appears once per instance, a named result carries its
--       seq.
-- Returns one code per instance, in p_ids' order: the new state_version, or _apply_v1's
-- -1 / -2 / -3, for which nothing of that instance was written (the others were: the caller
-- commits them, rolls everything back, or recomputes the stale ones under the runs locks it
-- now holds and calls again). Same lock order as _apply_v1: runs rows first, in ascending
-- instance order, then tasks, nodes, instances.
create function @engine@._apply_v2(
    p_owner text, p_lease_seconds integer, p_ids varchar[], p_versions bigint[],
    p_counts integer[], p_statuses text[], p_states bytea[], p_fence_ids varchar[],
    p_fence_nodes varchar[], p_fence_gens integer[], p_drop_ids varchar[],
    p_drop_nodes varchar[], p_nodes jsonb, p_new_tasks jsonb, p_named jsonb)
returns bigint[]
language plpgsql volatile
set search_path = pg_catalog, pg_temp
-- Every statement below reaches a table row by row, each row by its key (a scalar sub-select
-- on the primary key, then the row by its ctid): the planner cannot know how few rows the
-- arguments hold (jsonb_to_recordset counts as 100, an array as 10), and with the statistics
-- of a table that churns it chose to walk all of this worker's leased tasks for every fence
-- (9 ms a call in W3). The ctids are those of rows this call locked (or that only writers
-- holding the runs row change), so they stay valid until the COMMIT. Plans are generic: a
-- custom plan (what plpgsql tries first, and keeps when a generic one looks dearer for an
-- array of unknown size) plans each of these statements again at every call. No JIT: on
-- PostgreSQL 14-17 a path these settings disable still costs 10^10 when it is the only one,
-- past jit_above_cost, and compiling a statement takes 0.1-0.5 s where running it takes a
-- millisecond (a statement of this function with a seq scan forced in: 1.7 ms without JIT,
-- 470 ms with it, on the local PostgreSQL 15).
set enable_hashjoin = off
set enable_mergejoin = off
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
set jit = off
as $$
declare
    v_n        pg_catalog.int4;
    v_codes    pg_catalog.int8[];
    v_ok       pg_catalog.varchar[];
    v_fence    pg_catalog.tid[];
    v_fenced   pg_catalog.varchar[];
    v_inst     pg_catalog.tid[];
    v_inst_ids pg_catalog.varchar[];
    v_owner    pg_catalog.text;
begin
    v_n := coalesce(cardinality(p_ids), 0);
    if v_n = 0 then
        return '{}';
    end if;
    if cardinality(p_versions) <> v_n or cardinality(p_counts) <> v_n
       or cardinality(p_statuses) <> v_n or cardinality(p_states) <> v_n
       or coalesce(cardinality(p_fence_ids), 0) <> coalesce(cardinality(p_fence_nodes), 0)
       or coalesce(cardinality(p_fence_ids), 0) <> coalesce(cardinality(p_fence_gens), 0)
       or coalesce(cardinality(p_drop_ids), 0) <> coalesce(cardinality(p_drop_nodes), 0)
       or (select count(distinct u.id) from unnest(p_ids) u(id)) <> v_n then
        raise exception 'pgdurable: _apply_v2 needs arrays of one length and one element per instance'
            using errcode = '22023';
    end if;

    -- the runs rows, in ascending instance order (as every writer of an instance)
    perform 1 from @engine@.runs r where r.instance_id = any (p_ids)
    order by r.instance_id
    for update of r;

    -- the fence tasks that are still ours, locked (a rescue cannot take one before the
    -- delete below): one key lookup each (lateral: the arguments drive; coalesce: no partial
    -- index on lease_owner is a candidate). By key, not by ctid: a heartbeat extending the
    -- lease meanwhile makes a new row version, which must still count as ours.
    select array_agg(l.ctid), array_agg(l.instance_id) into v_fence, v_fenced
    from unnest(p_fence_ids, p_fence_nodes, p_fence_gens) as fe(i, n, g)
    cross join lateral (
        select t.ctid, t.instance_id from @engine@.tasks t
        where t.instance_id = fe.i and t.node_id = fe.n and t.gen = fe.g
          and coalesce(t.lease_owner, '') = p_owner
        for update of t
    ) l;

    -- -2: gone, terminal, or a fence task not ours; -1: stale
    select array_agg(case
               when q.version is null or q.status is null
                    or q.status in ('completed', 'failed', 'cancelled') then -2
               when q.version <> q.v then -1
               when q.fences <> q.held then -2
               else 0 end order by q.ord)
    into v_codes
    from (
        select u.ord, u.v,
               (select r.state_version from @engine@.runs r where r.instance_id = u.id) as version,
               (select i.status from df.instances i where i.id = u.id) as status,
               (select count(*) from unnest(p_fence_ids) f(i) where f.i = u.id) as fences,
               (select count(*) from unnest(v_fenced) f(i) where f.i = u.id) as held
        from unnest(p_ids, p_versions) with ordinality as u(id, v, ord)
    ) q;

    -- -3: a new instance status needs its row, and its owner may hold it: never wait
    if exists (select 1 from unnest(p_statuses, v_codes) s(st, c) where s.st is not null and s.c = 0) then
        select array_agg(i.ctid), array_agg(i.id) into v_inst, v_inst_ids
        from (
            select i.ctid, i.id from df.instances i
            where i.id = any (array(select s.id from unnest(p_ids, p_statuses, v_codes) s(id, st, c)
                                    where s.st is not null and s.c = 0))
            order by i.id
            for update of i skip locked
        ) i;
        select array_agg(case when u.c = 0 and u.st is not null
                                   and not (u.id = any (coalesce(v_inst_ids, '{}'))) then -3
                              else u.c end order by u.ord)
        into v_codes
        from unnest(p_ids, p_statuses, v_codes) with ordinality as u(id, st, c, ord);
    end if;

    select array_agg(u.id) into v_ok from unnest(p_ids, v_codes) u(id, c) where u.c = 0;
    if v_ok is null then
        return v_codes;
    end if;

    delete from @engine@.tasks t
    where t.ctid = any (v_fence) and t.instance_id = any (v_ok);

    -- abandoned leaves (RACE losers, failed JOIN siblings, break): as in _apply_v1. Rare: one
    -- delete each, by key (a claim may move such a task meanwhile: it goes all the same)
    if coalesce(cardinality(p_drop_ids), 0) > 0 then
        v_n := 0;
        for i in 1 .. cardinality(p_drop_ids) loop
            continue when not (p_drop_ids[i] = any (v_ok));
            delete from @engine@.tasks t
            where t.instance_id = p_drop_ids[i] and t.node_id = p_drop_nodes[i]
            returning t.lease_owner into v_owner;
            if v_owner is not null then
                v_n := v_n + 1;
            end if;
        end loop;
        if v_n > 0 then
            perform pg_catalog.pg_notify('pgdurable_abandon', '');
        end if;
    end if;

    if p_nodes is not null then
        -- only checkpoints (under the runs row) and df.cancel (after it) change df.nodes rows
        update df.nodes n
        set status = coalesce(u.status, n.status),
            result = case when u.status is null then n.result
                          when u.status in ('completed', 'failed') then u.result end,
            status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb) || coalesce(u.details, '{}'::pg_catalog.jsonb)
                || coalesce(case when u.status in ('completed', 'failed')
                                  and u.details ? 'finished_at' then
                    jsonb_build_object('duration_ms', round(1000 * extract(epoch from
                        (u.details ->> 'finished_at')::pg_catalog.timestamptz
                        - coalesce(u.details ->> 'started_at',
                                   n.status_details ->> 'started_at')::pg_catalog.timestamptz))) end,
                            '{}'::pg_catalog.jsonb),
            updated_at = now()
        from (
            select u.*, (select n2.ctid from df.nodes n2
                         where n2.instance_id = u.i and n2.id = u.id) as tid
            from jsonb_to_recordset(p_nodes) as u(i pg_catalog.varchar, id pg_catalog.varchar, status pg_catalog.text, result pg_catalog.jsonb, details pg_catalog.jsonb)
            where u.i = any (v_ok)
        ) u
        where n.ctid = u.tid;
    end if;

    if p_new_tasks is not null then
        -- "take": leased to this worker already (hand-off), as in _apply_v1
        insert into @engine@.tasks as t (instance_id, node_id, gen, kind, due_at, deadline,
                                          submitted_by, database, lease_owner, lease_expires_at,
                                          attempts)
        select n.i, n.node_id, n.gen, n.kind,
               coalesce(n.due_at, @engine@.clock() + make_interval(secs => coalesce(n.delay, 0))),
               n.deadline,
               (select i.submitted_by from df.instances i where i.id = n.i),
               (select i.database from df.instances i where i.id = n.i),
               case when n.take then p_owner end,
               case when n.take then now() + make_interval(secs => p_lease_seconds) end,
               case when n.take then 1 else 0 end
        from jsonb_to_recordset(p_new_tasks)
                 as n(i pg_catalog.varchar, node_id pg_catalog.varchar, gen pg_catalog.int4,
                      kind pg_catalog.text, due_at pg_catalog.timestamptz, delay pg_catalog.float8,
                      deadline pg_catalog.timestamptz, take pg_catalog.bool)
        where n.i = any (v_ok)
        on conflict (instance_id, node_id) do update
            set gen = excluded.gen, kind = excluded.kind, due_at = excluded.due_at,
                deadline = excluded.deadline, lease_owner = excluded.lease_owner,
                lease_expires_at = excluded.lease_expires_at, attempts = excluded.attempts;
        if exists (select 1 from jsonb_to_recordset(p_new_tasks) as n(i pg_catalog.varchar, take pg_catalog.bool)
                   where n.take is not true and n.i = any (v_ok)) then
            perform pg_catalog.pg_notify('pgdurable_work', '');
        end if;
    end if;

    if p_named is not null then
        insert into @engine@.results as r (instance_id, name, value, seq)
        select e.i, e.key, e.value, e.seq
        from jsonb_to_recordset(p_named) as e(i pg_catalog.varchar, key pg_catalog.text, value pg_catalog.jsonb, seq pg_catalog.int8)
        where e.i = any (v_ok)
        on conflict (instance_id, name) do update set value = excluded.value, seq = excluded.seq;
    end if;

    if v_inst is not null then
        -- the rows locked above, of the instances written
        update df.instances i
        set status = u.st,
            updated_at = now(),
            completed_at = case when u.st in ('completed', 'failed', 'cancelled')
                                then now() else i.completed_at end
        from (
            select s.st, (select l.tid from unnest(v_inst, v_inst_ids) l(tid, id)
                          where l.id = s.id) as tid
            from unnest(p_ids, p_statuses) s(id, st)
            where s.st is not null and s.id = any (v_ok)
        ) u
        where i.ctid = u.tid;
        -- terminal: as in _apply_v1 (a failed or cancelled instance keeps its named results
        -- and signals for df.restart)
        select array_agg(s.id) into v_inst_ids from unnest(p_ids, p_statuses) s(id, st)
        where s.st in ('completed', 'failed', 'cancelled') and s.id = any (v_ok);
        if v_inst_ids is not null then
            delete from @engine@.tasks t where t.instance_id = any (v_inst_ids);
            select array_agg(s.id) into v_inst_ids from unnest(p_ids, p_statuses) s(id, st)
            where s.st = 'completed' and s.id = any (v_ok);
            if v_inst_ids is not null then
                delete from @engine@.signals s where s.instance_id = any (v_inst_ids);
                delete from @engine@.results r where r.instance_id = any (v_inst_ids);
            end if;
        end if;
    end if;

    update @engine@.runs r
    set state = u.st, state_version = r.state_version + u.k
    from (
        select s.st, s.k, (select r2.ctid from @engine@.runs r2 where r2.instance_id = s.id) as tid
        from unnest(p_ids, p_states, p_counts) s(id, st, k)
        where s.id = any (v_ok)
    ) u
    where r.ctid = u.tid;

    return array(select case when u.c = 0 then u.v + u.k else u.c end
                 from unnest(p_versions, p_counts, v_codes) with ordinality as u(v, k, c, ord)
                 order by u.ord);
end
$$;

create function @engine@._step_apply_v2(
    p_cap text, p_owner text, p_lease_seconds integer, p_ids varchar[], p_versions bigint[],
    p_counts integer[], p_statuses text[], p_states bytea[], p_fence_ids varchar[],
    p_fence_nodes varchar[], p_fence_gens integer[], p_drop_ids varchar[],
    p_drop_nodes varchar[], p_nodes jsonb, p_new_tasks jsonb, p_named jsonb)
returns bigint[]
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform @engine@._cap_check_v1(p_cap);
    return @engine@._apply_v2(p_owner, p_lease_seconds, p_ids, p_versions, p_counts,
                              p_statuses, p_states, p_fence_ids, p_fence_nodes, p_fence_gens,
                              p_drop_ids, p_drop_nodes, p_nodes, p_new_tasks, p_named);
end
$$;

-- The codes of a batch's checkpoint call (_step_apply_v2) when it wrote every checkpoint;
-- otherwise it raises (SQLSTATE PDW01), so that the COMMIT the worker sends right after it,
-- in the same round trip, does not run: the worker then rolls back to the savepoint it took
-- before the call and takes the usual path (a stale instance computed again, a fenced one
-- refused). It reads nothing but its argument.
create function @engine@._all_written_v1(p_codes bigint[])
returns bigint[]
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_codes is null or exists (select 1 from unnest(p_codes) as c(c) where c.c < 0) then
        raise exception 'pgdurable: not every checkpoint of the call was written'
            using errcode = 'PDW01';
    end if;
    return p_codes;
end
$$;

-- A task that could not be handled in the attempts cap (its start included: a graph that
-- cannot even load): fail its instance with the reason, if the task is still ours.
create function @engine@._fail_instance_v1(p_owner text, p_instance varchar, p_node varchar,
                                           p_reason text)
returns boolean
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    perform 1 from @engine@.runs r where r.instance_id operator(pg_catalog.=) p_instance
    for update;
    -- never wait on a lock the instance's owner may hold on its row: try again later
    perform 1 from df.instances i where i.id operator(pg_catalog.=) p_instance
    for update skip locked;
    if not found then
        return false;
    end if;
    delete from @engine@.tasks t
    where t.instance_id operator(pg_catalog.=) p_instance
      and t.node_id operator(pg_catalog.=) p_node
      and t.lease_owner operator(pg_catalog.=) p_owner;
    if not found then
        return false;
    end if;
    update df.instances i
    set status = 'failed', updated_at = pg_catalog.now(), completed_at = pg_catalog.now()
    where i.id operator(pg_catalog.=) p_instance
      and i.status operator(pg_catalog.<>) all ('{completed,failed,cancelled}'::pg_catalog.text[]);
    update df.nodes n
    set status = 'failed', result = pg_catalog.to_jsonb(p_reason), updated_at = pg_catalog.now()
    where n.instance_id operator(pg_catalog.=) p_instance
      and n.id operator(pg_catalog.=) p_node
      and n.status operator(pg_catalog.<>) 'completed';
    -- its named results and signals stay for df.restart (pruned with the instance)
    delete from @engine@.tasks t where t.instance_id operator(pg_catalog.=) p_instance;
    return true;
end
$$;

-- df.setvar / df.unsetvar / df.clearvars write through this (tenants hold only SELECT on
-- df.vars: table-level DML would let one LOCK the shared table). Acts for the calling role
-- (@engine@._invoker()), on its own rows only. A role's vars are capped (they are frozen into
-- every instance it starts): pg_durable.vars_max_bytes, default 1 MiB in all.
create function @engine@._vars_v1(p_op text, p_name text, p_value text)
returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_me    pg_catalog.regrole;
    v_max   pg_catalog.int8 := @engine@.setting('vars_max_bytes', '1048576')::pg_catalog.int8;
    v_total pg_catalog.int8;
begin
    select r.oid::pg_catalog.regrole into v_me
    from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) @engine@._invoker();
    if v_me is null then
        raise exception 'no role to act for' using errcode = '42501';
    end if;
    if p_op operator(pg_catalog.=) 'set' then
        insert into df.vars as v (name, value, owner) values (p_name, p_value, v_me)
        on conflict on constraint vars_pkey do update set value = excluded.value;
        select pg_catalog.sum(pg_catalog.octet_length(v.name) operator(pg_catalog.+)
                              coalesce(pg_catalog.octet_length(v.value), 0))
        into v_total from df.vars v where v.owner operator(pg_catalog.=) v_me;
        if v_total operator(pg_catalog.>) v_max then
            raise exception 'df.setvar: the vars of role % would hold % bytes, over pg_durable.vars_max_bytes (%)',
                v_me, v_total, v_max
                using errcode = '54000',
                      hint = 'vars are copied into every instance the role starts: keep large data in a table and pass its key';
        end if;
    elsif p_op operator(pg_catalog.=) 'unset' then
        delete from df.vars v
        where v.owner operator(pg_catalog.=) v_me and v.name operator(pg_catalog.=) p_name;
    elsif p_op operator(pg_catalog.=) 'clear' then
        delete from df.vars v where v.owner operator(pg_catalog.=) v_me;
    else
        raise exception 'unknown vars operation %', p_op using errcode = '22023';
    end if;
    return 'OK';
end
$$;

-- transaction_mode 'new', the far side: called in the engine's dblink session, logged in as
-- the launcher role (the only role with EXECUTE), after @engine@._new_start_v1 checked that
-- its caller is p_role. Starts the instance for p_role exactly as df.start would in that
-- role's own session (the snapshot of its committed vars), and commits with this session.
create function @engine@._launch_v1(p_role oid, p_fut text, p_label text, p_database text)
returns varchar
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if session_user operator(pg_catalog.<>) (select l.rolname from @engine@.launcher l) then
        raise exception 'only the engine''s launcher session may launch' using errcode = '42501';
    end if;
    -- this transaction acts for p_role (@engine@._invoker(), as in a step)
    insert into @engine@.step_sessions as s (pid, xid, role)
    values (pg_catalog.pg_backend_pid(), pg_catalog.txid_current(), p_role)
    on conflict (pid) do update set xid = excluded.xid, role = excluded.role;
    return @engine@._start_v1(p_role::pg_catalog.regrole, p_fut, p_label, p_database);
end
$$;
