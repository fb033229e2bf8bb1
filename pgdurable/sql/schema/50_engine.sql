-- pgdurable schema, part 50: the worker protocol (STYLE B4: every function a worker calls has
-- a _vN suffix so two service versions can share a database during a rolling deploy).
--
--   _claim_v1      lease up to N runnable tasks (FOR UPDATE SKIP LOCKED)
--   _apply_v1      one checkpoint: fence, node writes, successor tasks, instance status, state
--   _release_v1    give leased tasks back (shutdown, infrastructure errors)
--   _rescue_v1     clear expired leases (maintenance), bounded
--   _extend_v1     extend the leases of a worker's in-flight tasks (heartbeat)
--   _runner_v1     create (once) the per-role step runner in @engine@_exec (docs/security.md)
--
-- Only the service role calls these; no grants are given to anyone else.

-- Claim: lock candidate rows with SKIP LOCKED so concurrent workers of any number of
-- `serve` processes never wait on each other, and never take more than the free slots;
-- steps of an instance another worker is running steps of are left to that worker.
-- The lease is measured on the server clock (now()), due times on @engine@.clock() so
-- tests can move time for timers and schedules.
create function @engine@._claim_v1(p_owner text, p_limit integer, p_lease_seconds integer)
returns table (instance_id varchar, node_id varchar, gen integer, kind text, attempts integer,
               submitted_by regrole, database text, deadline timestamptz, clock timestamptz,
               state_version bigint)
language sql volatile
set search_path = pg_catalog
as $$
    with picked as (
        select t.instance_id, t.node_id
        from @engine@.tasks t
        where t.lease_owner is null and t.due_at <= @engine@.clock()
          -- instance affinity: while another worker runs steps of an instance, its other
          -- runnable steps stay for that worker (it has the instance loaded, and two
          -- workers checkpointing one instance race and reload it); leases end, so a dead
          -- worker's instances come free with its leases
          and not exists (select 1 from @engine@.tasks o
                          where o.instance_id = t.instance_id and o.lease_owner is not null
                            and o.lease_owner <> p_owner)
        order by t.due_at
        limit p_limit
        for update skip locked
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
              (select r.state_version from @engine@.runs r where r.instance_id = t.instance_id)
$$;

-- One checkpoint of one instance. Returns the new state_version, or
--   -1  stale: state_version moved on since the worker loaded it (reload and recompute;
--       nothing was written, the caller's transaction can retry);
--   -2  fenced: the task is no longer ours (lease lost/rescued, abandoned, instance terminal
--       or cancelled) — the caller must roll back everything, including a step's own SQL.
-- Lock order: the runs row first (serialises all checkpoints of one instance across every
-- worker), then tasks, nodes, instances — every writer of an instance takes runs first
-- (df.cancel's helper does too), so checkpoints cannot deadlock each other.
create function @engine@._apply_v1(
    p_owner text, p_instance varchar, p_task_node varchar, p_task_gen integer,
    p_expected_version bigint, p_state bytea, p_inst_status text, p_nodes jsonb,
    p_new_tasks jsonb, p_drop_tasks text[], p_named jsonb, p_lease_seconds integer)
returns bigint
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_version bigint;
    v_status  text;
    v_dropped text[];
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
            perform pg_notify('pgdurable_abandon', p_instance || ':' || array_to_string(v_dropped, ','));
        end if;
    end if;

    if p_nodes is not null then
        update df.nodes n
        -- an entry without a status only merges details (e.g. a LOOP's iteration stamp)
        set status = coalesce(u.status, n.status),
            result = case when u.status is null then n.result
                          when u.status in ('completed', 'failed') then u.result end,
            status_details = coalesce(n.status_details, '{}'::jsonb) || coalesce(u.details, '{}'::jsonb)
                || coalesce(case when u.status in ('completed', 'failed')
                                  and u.details ? 'finished_at' then
                    jsonb_build_object('duration_ms', round(1000 * extract(epoch from
                        (u.details ->> 'finished_at')::timestamptz
                        - coalesce(u.details ->> 'started_at',
                                   n.status_details ->> 'started_at')::timestamptz))) end,
                            '{}'::jsonb),
            updated_at = now()
        from jsonb_to_recordset(p_nodes) as u(id varchar, status text, result jsonb, details jsonb)
        where n.instance_id = p_instance and n.id = u.id;
    end if;

    if p_new_tasks is not null then
        -- "take": the successor is handed straight to a free slot of this worker (DESIGN §2.5):
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
                 as n(node_id varchar, gen integer, kind text, due_at timestamptz,
                      delay double precision, deadline timestamptz, take boolean)
        cross join df.instances i
        where i.id = p_instance
        on conflict (instance_id, node_id) do update
            set gen = excluded.gen, kind = excluded.kind, due_at = excluded.due_at,
                deadline = excluded.deadline, lease_owner = excluded.lease_owner,
                lease_expires_at = excluded.lease_expires_at, attempts = excluded.attempts;
        if exists (select 1 from jsonb_to_recordset(p_new_tasks) as n(take boolean)
                   where n.take is not true) then
            perform pg_notify('pgdurable_work', p_instance);
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
            completed_at = case when p_inst_status = 'completed' then now() else i.completed_at end
        where i.id = p_instance;
        if p_inst_status in ('completed', 'failed', 'cancelled') then
            delete from @engine@.tasks t where t.instance_id = p_instance;
            delete from @engine@.signals s where s.instance_id = p_instance;
            delete from @engine@.results r where r.instance_id = p_instance;
            perform pg_notify('pgdurable_done', p_instance);
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
set search_path = pg_catalog
as $$
    update @engine@.tasks t
    set lease_owner = null, lease_expires_at = null
    where t.lease_owner = p_owner
      and (p_instance is null or (t.instance_id = p_instance and t.node_id = p_node))
$$;

-- Bounded sweep of expired leases: a step whose worker died (or was paused past its lease)
-- becomes claimable again; the old owner's late checkpoint is fenced by _apply_v1.
create function @engine@._rescue_v1(p_limit integer)
returns integer
language sql volatile
set search_path = pg_catalog
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
    )
    select count(*)::integer from upd
$$;

-- Only the tasks the worker is really running are extended: a task it lost track of must
-- expire and be rescued.
create function @engine@._extend_v1(p_owner text, p_lease_seconds integer,
                                    p_instances text[], p_nodes text[])
returns integer
language sql volatile
set search_path = pg_catalog
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
    select count(*)::integer from upd
$$;

-- The text of the runner's CREATE FUNCTION for a role, in a given schema: executed here by
-- _runner_v1, and by the worker in another database for `database =>` instances (the
-- runner must live in the database the step runs in).
create function @engine@._runner_ddl_v1(p_role regrole, p_schema text)
returns text
language sql immutable
set search_path = pg_catalog
as $$
    select format($f$
        create function %I.%I(p_sql text) returns setof json
        language plpgsql volatile security definer
        as $body$
        declare
            r record;
        begin
            begin
                for r in execute p_sql loop
                    return next to_json(r);
                end loop;
            exception when invalid_cursor_definition then
                if sqlerrm like '%%multi-query%%' then
                    raise exception 'a workflow SQL step must be exactly one statement'
                        using errcode = '42601',
                              hint = 'split it into several steps joined with ~>';
                end if;
                execute p_sql;
            end;
        end
        $body$;
        alter function %I.%I(text) owner to %s;
        revoke all on function %I.%I(text) from public;
        $f$, p_schema, 'step_' || p_role::oid::text, p_schema, 'step_' || p_role::oid::text,
        p_role, p_schema, 'step_' || p_role::oid::text)
$$;

create function @engine@._runner_v1(p_role regrole)
returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_name text := 'step_' || p_role::oid::text;
begin
    -- two workers meeting a new role at once: one creates, the other waits and finds it
    perform pg_advisory_xact_lock(1346913367, hashint8(p_role::oid::bigint));
    if not exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                   where n.nspname = '@engine@_exec' and p.proname = v_name) then
        execute @engine@._runner_ddl_v1(p_role, '@engine@_exec');
    end if;
    return format('%I.%I', '@engine@_exec', v_name);
end
$$;

create function @engine@._heartbeat_v1(p_worker_id text, p_kind text, p_host text, p_pid integer,
                                       p_version text, p_in_flight integer)
returns void
language sql volatile
set search_path = pg_catalog
as $$
    insert into @engine@.workers as w (worker_id, kind, host, pid, version, in_flight)
    values (p_worker_id, p_kind, p_host, p_pid, p_version, p_in_flight)
    on conflict (worker_id) do update
        set last_seen_at = now(), in_flight = excluded.in_flight;
    -- forget processes silent for a minute (crashed hosts); live ones re-insert themselves
    delete from @engine@.workers w where w.last_seen_at < now() - interval '60 seconds';
$$;

-- Caps on connections running step SQL (SPEC D13), each slot a transaction-scoped advisory
-- lock taken inside the step's own transaction, so the commit/rollback that ends the step
-- releases it — even when the worker dies:
--   pg_durable.max_user_connections (default 10): deployment-wide, class 'PGDU';
--   pg_durable.max_connections_per_role (default 0 = no per-role cap): per submitting role,
--     so one tenant cannot take every slot.
-- Waits (on one taken slot at a time, 100 ms each) up to pg_durable.execution_acquire_timeout
-- seconds, then fails the step.
create function @engine@._step_slot_v1(p_role oid)
returns integer
language plpgsql volatile
set search_path = pg_catalog
set lock_timeout = '100ms'
as $$
declare
    v_max      integer := @engine@.setting('max_user_connections', '10')::integer;
    v_role_max integer := @engine@.setting('max_connections_per_role', '0')::integer;
    v_timeout  integer := @engine@.setting('execution_acquire_timeout', '30')::integer;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => v_timeout);
    v_start    integer := floor(random() * v_max)::integer;
    v_got      integer;
    v_role_ok  boolean := v_role_max <= 0;
begin
    loop
        if not v_role_ok then
            -- per-role slots: key hash((role oid << 16) + slot) in their own key space PGDV
            for i in 0 .. v_role_max - 1 loop
                if pg_try_advisory_xact_lock(1346913366, hashint8((p_role::bigint << 16) + i)) then
                    v_role_ok := true;
                    exit;
                end if;
            end loop;
        end if;
        if v_role_ok then
            for i in 0 .. v_max - 1 loop
                if pg_try_advisory_xact_lock(1346913365, (v_start + i) % v_max) then
                    return (v_start + i) % v_max;
                end if;
            end loop;
        end if;
        if clock_timestamp() >= v_deadline then
            if not v_role_ok then
                raise exception 'connection limit reached: all max_connections_per_role=% step '
                                'slots of role % stayed busy for execution_acquire_timeout=%s',
                                v_role_max, p_role::regrole, v_timeout
                    using errcode = '53300',
                          hint = 'raise pg_durable.max_connections_per_role or lower the fan-out';
            end if;
            raise exception 'connection limit reached: all max_user_connections=% step slots '
                            'stayed busy for execution_acquire_timeout=%s', v_max, v_timeout
                using errcode = '53300',
                      hint = 'raise pg_durable.max_user_connections or lower the fan-out';
        end if;
        if v_role_ok then
            -- every slot is taken: wait on one (woken the moment its holder commits, not
            -- after a fixed sleep), at most lock_timeout, then look at all of them again
            begin
                perform pg_advisory_xact_lock(1346913365, v_start);
                return v_start;
            exception when lock_not_available then
                v_start := (v_start + 1) % v_max;
            end;
        else
            perform pg_sleep(0.05);
        end if;
    end loop;
end
$$;

-- Retention (SPEC §5): terminal instances older than pg_durable.retention_days are pruned in
-- bounded batches; pending/running work is never touched. One worker at a time (the caller
-- holds a try-advisory lock) so batches do not fight.
create function @engine@._prune_v1(p_limit integer)
returns integer
language sql volatile
set search_path = pg_catalog
as $$
    with old as (
        select i.id from df.instances i
        where i.status in ('completed', 'failed', 'cancelled')
          and i.updated_at < now() - make_interval(
                days => @engine@.setting('retention_days', '30')::integer)
          and @engine@.setting('retention_days', '30')::integer > 0
        order by i.updated_at
        limit p_limit
        for update skip locked
    ), gone as (
        delete from df.instances i using old where i.id = old.id returning i.id
    ), runs as (
        delete from @engine@.runs r using gone where r.instance_id = gone.id returning 1
    )
    select count(*)::integer from gone
$$;

-- Mark the current transaction as a step of p_role (see @engine@.step_sessions).
create function @engine@._step_begin_v1(p_role oid)
returns void
language sql volatile
set search_path = pg_catalog
as $$
    insert into @engine@.step_sessions as s (pid, xid, role)
    values (pg_backend_pid(), txid_current(), p_role)
    on conflict (pid) do update set xid = excluded.xid, role = excluded.role
$$;
