-- pgdurable schema, part 70: restarting a failed or cancelled instance (not in pg_durable).
--
--   @engine@.run_history          one row per ended run of a restarted instance
--   @engine@._state_ints_v1 / _state_bytes_v1   the worker's scheduler state blob <-> int8[]
--   @engine@._cron_next_v1        the next tick of a cron expression (a restarted schedule wait)
--   @engine@._restart_v1          df.restart's work (SECURITY DEFINER, checks the caller)
--   @engine@._run_history_v1      the past runs (SECURITY DEFINER, checks the caller)
--   df.restart(instance_id)       restart from where it failed; returns the instance id
--   df.instance_runs(instance_id) every run of an instance: started, ended, status, error
--
-- How a restart works (docs/restart.md). The worker keeps an instance's progress in its
-- scheduler state (@engine@.runs.state: the int64 arrays of pgdurable/graph/_sched_py.py,
-- dump_state: [version, n, started, terminal] + status + gen + aux + truth per node, nodes in
-- pre-order). A restart rewrites that state as the scheduler itself would have if the failed
-- part had never run: it walks the tree from the root, keeps every completed subtree as it is
-- (its results are not computed again), and re-activates what did not complete: a failed,
-- abandoned or still running leaf gets a new generation (so a late outcome of its old run is
-- fenced off) and a task; a composite resumes where it was (a THEN whose first part
-- completed runs its second part, an IF whose condition was decided runs the arm it took, a
-- JOIN re-runs the branches that did not complete, a RACE races again the branches that did
-- not complete, a LOOP resumes its current iteration, a RETRY (df.retry) resumes its step
-- where it failed with its attempts counted afresh: attempt 1 of max_attempts again, since
-- the restart is a new decision to try). The node rows are stamped as the
-- worker stamps them and the state version is bumped, so every worker's cached copy of the
-- instance is stale and is reloaded: the worker needs nothing new.
--
-- A run's history: the run that ended is recorded in @engine@.run_history (status, started,
-- ended, the error df.error showed or the cancel reason) before the instance runs again;
-- df.instance_runs lists those runs and the current one.

create table @engine@.run_history (
    instance_id  varchar(8)  not null,
    run          integer     not null,
    status       text        not null,
    started_at   timestamptz not null,
    ended_at     timestamptz,
    error        jsonb,
    restarted_at timestamptz not null default now(),
    restarted_by regrole     not null,
    primary key (instance_id, run)
);

-- The scheduler state blob as int8[] (1-based: [1] is the layout version). The worker writes
-- it in its machine's byte order (array('q').tobytes()); the version, 1, tells which.
create function @engine@._state_ints_v1(p_state bytea) returns int8[]
language sql immutable strict
set search_path = pg_catalog, pg_temp
as $$
    -- one pass over the hex text (get_byte on a large, toasted value would fetch it per call)
    select pg_catalog.array_agg(
               case when e.le
                    then (pg_catalog.get_byte(w.b, 0)::pg_catalog.int8 << 0) | (pg_catalog.get_byte(w.b, 1)::pg_catalog.int8 << 8)
                         | (pg_catalog.get_byte(w.b, 2)::pg_catalog.int8 << 16) | (pg_catalog.get_byte(w.b, 3)::pg_catalog.int8 << 24)
                         | (pg_catalog.get_byte(w.b, 4)::pg_catalog.int8 << 32) | (pg_catalog.get_byte(w.b, 5)::pg_catalog.int8 << 40)
                         | (pg_catalog.get_byte(w.b, 6)::pg_catalog.int8 << 48) | (pg_catalog.get_byte(w.b, 7)::pg_catalog.int8 << 56)
                    else (pg_catalog.get_byte(w.b, 0)::pg_catalog.int8 << 56) | (pg_catalog.get_byte(w.b, 1)::pg_catalog.int8 << 48)
                         | (pg_catalog.get_byte(w.b, 2)::pg_catalog.int8 << 40) | (pg_catalog.get_byte(w.b, 3)::pg_catalog.int8 << 32)
                         | (pg_catalog.get_byte(w.b, 4)::pg_catalog.int8 << 24) | (pg_catalog.get_byte(w.b, 5)::pg_catalog.int8 << 16)
                         | (pg_catalog.get_byte(w.b, 6)::pg_catalog.int8 << 8) | (pg_catalog.get_byte(w.b, 7)::pg_catalog.int8 << 0) end
               order by m.o)
    from (select pg_catalog.get_byte(p_state, 0) <> 0 as le) e
    cross join pg_catalog.regexp_matches(pg_catalog.encode(p_state, 'hex'), '[0-9a-f]{16}', 'g')
        with ordinality m(c, o)
    cross join lateral (select pg_catalog.decode(m.c[1], 'hex') as b) w
$$;

-- The inverse: p_ints as the blob, in the byte order of p_like (the blob it was read from).
create function @engine@._state_bytes_v1(p_ints int8[], p_like bytea) returns bytea
language sql immutable strict
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.decode(coalesce(pg_catalog.string_agg(
               case when not e.le then x.hx
                    else (select pg_catalog.string_agg(pg_catalog.substr(x.hx, 15 - 2 * k.k, 2), ''
                                                       order by k.k)
                          from pg_catalog.generate_series(0, 7) k(k)) end,
               '' order by u.i), ''), 'hex')
    from pg_catalog.unnest(p_ints) with ordinality u(v, i)
    cross join (select pg_catalog.get_byte(p_like, 0) <> 0 as le) e
    cross join lateral (select pg_catalog.lpad(pg_catalog.to_hex(u.v), 16, '0') as hx) x
$$;

-- The first tick of a cron expression strictly after p_after, to the whole minute, in UTC: what
-- the worker computes with cronsim (pgdurable/cron.py) for a schedule wait it activates. The
-- expressions df.wait_for_schedule accepts (df._check_cron: the macros, five fields of *, n,
-- a-b, /step, month and weekday names; day-of-month and day-of-week both restricted match
-- either). Anything else raises 22023 naming the expression. Scans at most five years of days.
create function @engine@._cron_next_v1(p_expr text, p_after timestamptz) returns timestamptz
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    c_min    constant pg_catalog.int4[] := array[0, 0, 1, 1, 0];
    c_max    constant pg_catalog.int4[] := array[59, 23, 31, 12, 7];
    c_names  constant pg_catalog.text[] := array['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL',
                                                 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
    c_days   constant pg_catalog.text[] := array['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
    v_expr   pg_catalog.text := pg_catalog.btrim(coalesce(p_expr, ''));
    v_parts  pg_catalog.text[];
    v_sets   pg_catalog.bool[] := pg_catalog.array_fill(false, array[5, 61]);
    v_item   pg_catalog.text;
    v_base   pg_catalog.text;
    v_step   pg_catalog.int4;
    v_lo     pg_catalog.int4;
    v_hi     pg_catalog.int4;
    v_and    pg_catalog.bool;
    v_start  pg_catalog.timestamp;
    v_day    pg_catalog.date;
    v_h      pg_catalog.int4;
    v_m      pg_catalog.int4;
    v_dom    pg_catalog.bool;
    v_dow    pg_catalog.bool;
begin
    v_expr := case pg_catalog.lower(v_expr)
        when '@yearly' then '0 0 1 1 *' when '@annually' then '0 0 1 1 *'
        when '@monthly' then '0 0 1 * *' when '@weekly' then '0 0 * * 0'
        when '@daily' then '0 0 * * *' when '@midnight' then '0 0 * * *'
        when '@hourly' then '0 * * * *' else v_expr end;
    v_parts := pg_catalog.regexp_split_to_array(v_expr, '\s+');
    if pg_catalog.cardinality(v_parts) <> 5 then
        raise exception 'cannot compute the next tick of cron expression %: expected 5 fields',
            pg_catalog.quote_literal(p_expr) using errcode = '22023';
    end if;
    for f in 1..5 loop
        foreach v_item in array pg_catalog.string_to_array(pg_catalog.upper(v_parts[f]), ',') loop
            v_base := pg_catalog.split_part(v_item, '/', 1);
            v_step := 1;
            if v_item ~ '/' then
                if pg_catalog.split_part(v_item, '/', 2) !~ '^[0-9]{1,4}$' then
                    v_base := '?';
                else
                    v_step := pg_catalog.split_part(v_item, '/', 2)::pg_catalog.int4;
                end if;
            end if;
            -- names become numbers (JAN = 1, SUN = 0)
            if f = 4 then
                for k in 1..12 loop
                    v_base := pg_catalog.replace(v_base, c_names[k], k::pg_catalog.text);
                end loop;
            elsif f = 5 then
                for k in 1..7 loop
                    v_base := pg_catalog.replace(v_base, c_days[k], (k - 1)::pg_catalog.text);
                end loop;
            end if;
            if v_base = '*' then
                v_lo := c_min[f];
                v_hi := c_max[f];
            elsif v_base ~ '^[0-9]{1,4}-[0-9]{1,4}$' then
                v_lo := pg_catalog.split_part(v_base, '-', 1)::pg_catalog.int4;
                v_hi := pg_catalog.split_part(v_base, '-', 2)::pg_catalog.int4;
            elsif v_base ~ '^[0-9]{1,4}$' then
                v_lo := v_base::pg_catalog.int4;
                v_hi := case when v_item ~ '/' then c_max[f] else v_lo end;
            else
                v_lo := null;
            end if;
            if v_lo is null or v_step < 1 or v_lo < c_min[f]
               or v_hi > c_max[f] or v_lo > v_hi then
                raise exception 'cannot compute the next tick of cron expression %: % is not supported here',
                    pg_catalog.quote_literal(p_expr), pg_catalog.quote_literal(v_item)
                    using errcode = '22023';
            end if;
            for k in v_lo..v_hi by v_step loop
                -- weekday 7 is Sunday (0)
                v_sets[f][case when f = 5 and k = 7 then 1
                               else k + 1 end] := true;
            end loop;
        end loop;
    end loop;
    v_and := pg_catalog.left(v_parts[3], 1) = '*'
             or pg_catalog.left(v_parts[5], 1) = '*';
    v_start := pg_catalog.date_trunc('minute', p_after at time zone 'UTC')
               + '1 minute'::pg_catalog.interval;
    v_day := v_start::pg_catalog.date;
    for d in 0..1830 loop
        if v_sets[4][pg_catalog.date_part('month', v_day)::pg_catalog.int4 + 1] then
            v_dom := v_sets[3][pg_catalog.date_part('day', v_day)::pg_catalog.int4 + 1];
            v_dow := v_sets[5][pg_catalog.date_part('dow', v_day)::pg_catalog.int4 + 1];
            if (v_and and v_dom and v_dow) or (not v_and and (v_dom or v_dow)) then
                for h in case when d = 0
                              then pg_catalog.date_part('hour', v_start)::pg_catalog.int4 else 0 end..23 loop
                    continue when not v_sets[2][h + 1];
                    v_m := case when d = 0
                                     and h = pg_catalog.date_part('hour', v_start)
                                then pg_catalog.date_part('minute', v_start)::pg_catalog.int4 else 0 end;
                    for m in v_m..59 loop
                        if v_sets[1][m + 1] then
                            return (v_day + pg_catalog.make_time(h, m, 0))
                                   at time zone 'UTC';
                        end if;
                    end loop;
                end loop;
            end if;
        end if;
        v_day := v_day + 1;
    end loop;
    raise exception 'cron expression % has no tick in the next five years', pg_catalog.quote_literal(p_expr)
        using errcode = '22023';
end
$$;

-- df.restart's work, for the caller (its check, then _restart_core_v1).
create function @engine@._restart_v1(p_instance_id varchar) returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return @engine@._restart_core_v1(p_instance_id, false);
end
$$;

-- The restart itself. p_engine: the engine restarts the instance (a df.foreach body of a
-- restarted FOREACH, 38_foreach.sql), not a caller whose ownership is checked here; no role
-- but the engine's owner may call it. Lock order as every writer of an instance: the runs
-- row, then the instance row (a second restart waits here, then finds the instance running
-- and is refused).
create function @engine@._restart_core_v1(p_instance_id varchar, p_engine boolean) returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    -- scheduler codes (pgdurable/graph/_abc.py)
    c_pending   constant pg_catalog.int8 := 0;
    c_running   constant pg_catalog.int8 := 1;
    c_completed constant pg_catalog.int8 := 2;
    c_failed    constant pg_catalog.int8 := 3;
    c_leaves    constant pg_catalog.text[] := array['SQL', 'BREAK', 'SLEEP', 'WAIT_SCHEDULE',
                                                    'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'FOREACH'];
    v_run       record;
    v_inst      record;
    v_me        pg_catalog.regrole;
    v_ints      pg_catalog.int8[];
    v_n         pg_catalog.int4;
    v_ids       pg_catalog.text[];
    v_types     pg_catalog.text[];
    v_queries   pg_catalog.text[];
    v_parent    pg_catalog.int4[];
    v_left      pg_catalog.int4[];
    v_right     pg_catalog.int4[];
    v_cond      pg_catalog.int4[];  -- 0: none, -2: an if_rows IF
    v_extra     pg_catalog.int4[];
    v_end       pg_catalog.int4[];  -- one past the subtree (pre-order: a contiguous range)
    v_status    pg_catalog.int8[];
    v_gen       pg_catalog.int8[];
    v_aux       pg_catalog.int8[];
    v_truth     pg_catalog.int8[];
    v_stack     pg_catalog.int4[] := '{}';  -- > 0: resume the node, < 0: activate it
    v_top       pg_catalog.int4 := 0;
    v_x         pg_catalog.int4;
    v_i         pg_catalog.int4;
    v_b         pg_catalog.int4;
    v_k         pg_catalog.int8;
    v_cap       pg_catalog.int8;
    v_raw       pg_catalog.text;
    v_started   pg_catalog.int4[] := '{}';  -- activated now (leaves get a task)
    v_resumed   pg_catalog.int4[] := '{}';  -- composites that go on where they were
    v_reset     pg_catalog.int4[] := '{}';  -- failed/running rows that are pending again
    v_iterated  pg_catalog.int4[] := '{}';  -- loops that begin their next iteration
    v_retried   pg_catalog.int4[] := '{}';  -- RETRYs that resume at attempt 1
    v_seq       pg_catalog.int8;
    v_ts        pg_catalog.text := pg_catalog.to_char(pg_catalog.now() at time zone 'UTC',
                                                      'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"');
    v_clock     pg_catalog.timestamptz := @engine@.clock();
    v_error     pg_catalog.jsonb;
    v_last      record;
    v_done      pg_catalog.bool := false;
    v_uids      pg_catalog.text[] := '{}';   -- node row updates: id, status, details
    v_ustat     pg_catalog.text[] := '{}';
    v_udet      pg_catalog.jsonb[] := '{}';
    v_bids      pg_catalog.text[] := '{}';   -- IF arms taken now
    v_bdet      pg_catalog.jsonb[] := '{}';
    v_tids      pg_catalog.text[] := '{}';   -- tasks: node, gen, kind, due, deadline
    v_tgen      pg_catalog.int4[] := '{}';
    v_tkind     pg_catalog.text[] := '{}';
    v_tdue      pg_catalog.timestamptz[] := '{}';
    v_tdead     pg_catalog.timestamptz[] := '{}';
    v_cfg       pg_catalog.jsonb;
begin
    -- the caller first, before any lock: a call on another role's instance takes none (the
    -- owner of an instance never changes)
    select i.submitted_by into v_me from df.instances i where i.id = p_instance_id;
    if v_me is null or not (p_engine or @engine@._may_act(v_me)) then
        raise exception 'Instance not found or access denied: %', p_instance_id using errcode = 'P0002';
    end if;
    select r.state, r.state_version, r.cancel_reason into v_run
    from @engine@.runs r where r.instance_id = p_instance_id
    for update;
    select i.id, i.status, i.root_node, i.submitted_by, i.database, i.created_at, i.completed_at
    into v_inst
    from df.instances i where i.id = p_instance_id
    for update;
    if v_inst.status <> all ('{failed,cancelled}'::pg_catalog.text[]) then
        raise exception 'Instance % is %; only a failed or cancelled instance can be restarted',
            p_instance_id, v_inst.status
            using errcode = '55000',
                  hint = case when v_inst.status = 'completed'
                              then 'it ran to the end: df.start a new instance to run it again'
                              else 'wait for it to end, or df.cancel it first' end;
    end if;
    if v_run.state_version is null then
        raise exception 'Instance % was never handed to the engine (its rows were written without df.start), so it cannot be restarted',
            p_instance_id using errcode = '55000';
    end if;
    select r.oid::pg_catalog.regrole into v_me
    from pg_catalog.pg_roles r where r.rolname = @engine@._invoker() and not p_engine;

    -- 1. the run that ended, kept for df.instance_runs
    select h.run, h.restarted_at into v_last
    from @engine@.run_history h where h.instance_id = p_instance_id
    order by h.run desc limit 1;
    v_error := case when v_inst.status = 'failed' then df.error(p_instance_id)
                    else pg_catalog.jsonb_build_object(
                             'node_id', null, 'node_type', null, 'sqlstate', null,
                             'error', 'cancelled: ' ||
                                      coalesce(v_run.cancel_reason, 'status set to cancelled')) end;
    insert into @engine@.run_history (instance_id, run, status, started_at, ended_at, error,
                                      restarted_by)
    values (p_instance_id, coalesce(v_last.run, 0) + 1, v_inst.status,
            coalesce(v_last.restarted_at, v_inst.created_at), v_inst.completed_at, v_error,
            coalesce(v_me, v_inst.submitted_by));

    v_seq := v_run.state_version + 1;
    delete from @engine@.tasks t where t.instance_id = p_instance_id;

    if v_run.state is null or pg_catalog.get_byte(v_run.state, 16) +
                               pg_catalog.get_byte(v_run.state, 23) = 0 then
        -- no worker started it (cancelled before, or its graph could not load): start it again
        update @engine@.runs r set state = null, state_version = v_seq, cancel_reason = null
        where r.instance_id = p_instance_id;
        insert into @engine@.tasks (instance_id, node_id, gen, kind, due_at, submitted_by, database)
        values (p_instance_id, v_inst.root_node, 0, 'start', pg_catalog.now(), v_inst.submitted_by,
                v_inst.database);
        update df.nodes n
        set status = 'pending', result = null, updated_at = pg_catalog.now(),
            status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb)
                             || '{"abandoned": null, "error_node": null}'::pg_catalog.jsonb
        where n.instance_id = p_instance_id
          and n.status <> 'pending';
        update df.instances i
        set status = 'running', updated_at = pg_catalog.now(), completed_at = null
        where i.id = p_instance_id;
        perform pg_catalog.pg_notify('pgdurable_work', '');
        return p_instance_id;
    end if;

    -- 2. the graph as the worker compiles it (pgdurable/graph/compile.py): pre-order from the
    --    root, children in the order condition, left, right, extra
    with recursive nd as (
        select x.id, x.node_type, x.query, x.left_node, x.right_node,
               case when x.node_type = any ('{IF,LOOP,JOIN}'::pg_catalog.text[])
                    then df._try_jsonb(x.query) end as qj
        from df.nodes x where x.instance_id = p_instance_id
    ), walk(id, path, parent) as (
        select v_inst.root_node::pg_catalog.text, array[]::pg_catalog.int4[], null::pg_catalog.text
        union all
        select c.child, w.path || c.ord, w.id
        from walk w
        join nd p on p.id = w.id
        cross join lateral (
            select p.qj ->> 'condition_node' as child, 0 as ord
            where p.node_type = any ('{IF,LOOP}'::pg_catalog.text[])
              and pg_catalog.jsonb_typeof(p.qj -> 'condition_node') = 'string'
              and (p.qj ->> 'condition_type') is distinct from 'result_has_rows'
            union all
            select p.left_node::pg_catalog.text, 1 where p.left_node is not null
            union all
            select p.right_node::pg_catalog.text, 2 where p.right_node is not null
            union all
            select p.qj #>> '{extra_nodes,0}', 3
            where p.node_type = 'JOIN'
              and pg_catalog.jsonb_typeof(p.qj #> '{extra_nodes,0}') = 'string'
        ) c
        where pg_catalog.cardinality(w.path) < 300
    ), ord as (
        select w.id, w.parent, pg_catalog.row_number() over (order by w.path)::pg_catalog.int4 as i
        from walk w
    )
    select pg_catalog.array_agg(o.id order by o.i), pg_catalog.array_agg(d.node_type order by o.i),
           pg_catalog.array_agg(d.query order by o.i),
           pg_catalog.array_agg(coalesce(po.i, 0) order by o.i),
           pg_catalog.array_agg(coalesce(lo.i, 0) order by o.i),
           pg_catalog.array_agg(coalesce(ro.i, 0) order by o.i),
           pg_catalog.array_agg(case when d.node_type = 'IF'
                                          and d.qj ->> 'condition_type' = 'result_has_rows'
                                     then -2 else coalesce(co.i, 0) end order by o.i),
           pg_catalog.array_agg(coalesce(eo.i, 0) order by o.i)
    into v_ids, v_types, v_queries, v_parent, v_left, v_right, v_cond, v_extra
    from ord o
    join nd d on d.id = o.id
    left join ord po on po.id = o.parent
    left join ord lo on lo.id = d.left_node and lo.parent = o.id
    left join ord ro on ro.id = d.right_node and ro.parent = o.id
    left join ord co on co.id = (d.qj ->> 'condition_node') and co.parent = o.id
                        and d.node_type = any ('{IF,LOOP}'::pg_catalog.text[])
    left join ord eo on eo.id = (d.qj #>> '{extra_nodes,0}') and eo.parent = o.id
                        and d.node_type = 'JOIN';
    v_n := coalesce(pg_catalog.cardinality(v_ids), 0);
    v_ints := @engine@._state_ints_v1(v_run.state);
    if v_n = 0
       or pg_catalog.cardinality(v_ints) <> 4 + 4 * v_n
       or v_ints[1] <> 1 or v_ints[2] <> v_n then
        raise exception 'Instance % cannot be restarted: its saved progress does not match its graph (state layout %, % nodes)',
            p_instance_id, v_ints[1], v_n using errcode = '55000';
    end if;
    v_status := v_ints[5:4 + v_n];
    v_gen := v_ints[5 + v_n:4 + 2 * v_n];
    v_aux := v_ints[5 + 2 * v_n:4 + 3 * v_n];
    v_truth := v_ints[5 + 3 * v_n:4 + 4 * v_n];
    -- subtree ends: sizes summed bottom-up (a child's index is above its parent's)
    v_end := pg_catalog.array_fill(1, array[v_n]);
    for i in reverse v_n..2 loop
        v_end[v_parent[i]] := v_end[v_parent[i]] + v_end[i];
    end loop;
    for i in 1..v_n loop
        v_end[i] := i + v_end[i];
    end loop;

    -- 3. resume from the root (the scheduler's own rules, _sched_py.py)
    if v_status[1] = c_completed then
        v_done := true;  -- it had finished; only its status said otherwise
    else
        v_stack[1] := 1;
        v_top := 1;
    end if;
    while v_top > 0 loop
        v_x := v_stack[v_top];
        v_top := v_top - 1;
        v_i := abs(v_x);
        continue when v_status[v_i] = c_completed;
        if v_x > 0 and v_status[v_i] <> c_pending
           and v_types[v_i] <> all (c_leaves)
           and not (v_types[v_i] = 'IF' and v_cond[v_i] = -2
                    and v_aux[v_i] = 0) then
            -- a composite that had begun: it goes on where it was
            v_status[v_i] := c_running;
            v_resumed := v_resumed || v_i;
            case v_types[v_i]
                when 'THEN' then
                    if v_status[v_left[v_i]] = c_completed then
                        v_top := v_top + 1;
                        v_stack[v_top] := v_right[v_i];
                    else
                        v_top := v_top + 1;
                        v_stack[v_top] := v_left[v_i];
                    end if;
                when 'IF' then
                    if v_aux[v_i] = 1 then
                        v_top := v_top + 1;
                        v_stack[v_top] := v_left[v_i];
                    elsif v_aux[v_i] = 2 then
                        v_top := v_top + 1;
                        v_stack[v_top] := v_right[v_i];
                    else
                        v_top := v_top + 1;
                        v_stack[v_top] := v_cond[v_i];
                    end if;
                when 'LOOP' then
                    if v_status[v_left[v_i]] <> c_completed then
                        v_top := v_top + 1;
                        v_stack[v_top] := v_left[v_i];
                    elsif v_cond[v_i] > 0
                          and v_status[v_cond[v_i]] <> c_completed then
                        v_top := v_top + 1;
                        v_stack[v_top] := v_cond[v_i];
                    else
                        -- it failed on its iteration cap: the next iteration, if the cap allows
                        if v_cap is null then
                            v_raw := @engine@.setting_db('loop_max_iterations', '100000');
                            v_cap := case when v_raw ~ '^\s*[0-9]{1,18}\s*$'
                                          then v_raw::pg_catalog.int8 else 100000 end;
                            v_raw := @engine@._role_setting_v1(v_inst.submitted_by::pg_catalog.oid,
                                                               'pg_durable.loop_max_iterations');
                            if v_raw ~ '^\s*[0-9]{1,18}\s*$' then
                                v_cap := least(v_cap, v_raw::pg_catalog.int8);
                            end if;
                        end if;
                        v_k := v_aux[v_i] + 1;
                        if v_k > v_cap then
                            raise exception 'Instance % cannot be restarted: its loop % stopped at pg_durable.loop_max_iterations (%), and iteration % would exceed it again',
                                p_instance_id, v_ids[v_i], v_cap, v_k
                                using errcode = '55000',
                                      hint = 'raise pg_durable.loop_max_iterations (ALTER DATABASE … SET, or the role''s own setting) first';
                        end if;
                        v_aux[v_i] := v_k;
                        for j in v_i + 1..v_end[v_i] - 1 loop
                            v_status[j] := c_pending;
                            v_aux[j] := 0;
                            v_truth[j] := 0;
                        end loop;
                        v_iterated := v_iterated || v_i;
                        v_top := v_top + 1;
                        v_stack[v_top] := (-v_left[v_i]);
                    end if;
                when 'RETRY' then
                    -- its step goes on where it failed (or was stopped), as attempt 1 again
                    v_aux[v_i] := 1;
                    v_retried := v_retried || v_i;
                    v_top := v_top + 1;
                    v_stack[v_top] := v_left[v_i];
                else  -- JOIN, RACE: every branch that did not complete
                    v_aux[v_i] := 0;
                    foreach v_b in array array[v_left[v_i], v_right[v_i], v_extra[v_i]] loop
                        continue when v_b <= 0;
                        if v_status[v_b] = c_completed then
                            if v_types[v_i] = 'JOIN' then
                                v_aux[v_i] := v_aux[v_i] + 1;
                            end if;
                        else
                            v_top := v_top + 1;
                            v_stack[v_top] := v_b;
                        end if;
                    end loop;
            end case;
            continue;
        end if;
        -- a leaf, an undecided if_rows IF, or a node that had not begun: a new activation
        -- (its subtree first made pending: what ran of it before does not count)
        for j in v_i..v_end[v_i] - 1 loop
            if v_status[j] = any (array[c_running, c_failed]) and j <> v_i then
                v_reset := v_reset || j;
            end if;
            if j <> v_i then
                v_status[j] := c_pending;
                v_aux[j] := 0;
                v_truth[j] := 0;
            end if;
        end loop;
        -- as the scheduler's _activate: this node, then what it starts with
        v_status[v_i] := c_running;
        v_gen[v_i] := v_gen[v_i] + 1;
        v_aux[v_i] := 0;
        v_truth[v_i] := 0;
        v_started := v_started || v_i;
        case
            when v_types[v_i] = any (c_leaves) then
                null;  -- ready: it gets a task (5.)
            when v_types[v_i] = 'THEN' then
                v_top := v_top + 1;
                v_stack[v_top] := (-v_left[v_i]);
            when v_types[v_i] = 'IF' then
                if v_cond[v_i] = -2 then
                    null;  -- decided by the worker: it gets a task (5.)
                else
                    v_top := v_top + 1;
                    v_stack[v_top] := (-v_cond[v_i]);
                end if;
            when v_types[v_i] in ('LOOP', 'RETRY') then
                v_aux[v_i] := 1;
                v_top := v_top + 1;
                v_stack[v_top] := (-v_left[v_i]);
            else
                if v_extra[v_i] > 0 then
                    v_top := v_top + 1;
                    v_stack[v_top] := (-v_extra[v_i]);
                end if;
                v_top := v_top + 1;
                v_stack[v_top] := -v_right[v_i];
                v_top := v_top + 1;
                v_stack[v_top] := -v_left[v_i];
        end case;
    end loop;

    -- 4. the new state (terminal: running), a version every cached copy is older than
    v_ints := array[v_ints[1], v_ints[2], 1, case when v_done then 1 else 0 end]
              || v_status || v_gen
              || v_aux || v_truth;
    update @engine@.runs r
    set state = @engine@._state_bytes_v1(v_ints, v_run.state), state_version = v_seq,
        cancel_reason = null
    where r.instance_id = p_instance_id;

    -- 5. the node rows, as the worker stamps them (pgdurable/worker/instance.py, build); a
    --    node listed twice takes its last entry (started after reset)
    foreach v_i in array v_reset loop
        v_uids := v_uids || v_ids[v_i];
        v_ustat := v_ustat || 'pending'::pg_catalog.text;
        v_udet := v_udet || '{"abandoned": null, "error_node": null, "finished_at": null, "sqlstate": null}'::pg_catalog.jsonb;
    end loop;
    foreach v_i in array v_resumed loop
        v_uids := v_uids || v_ids[v_i];
        v_ustat := v_ustat || 'running'::pg_catalog.text;
        v_udet := v_udet || (pg_catalog.jsonb_build_object(
                'abandoned', null, 'error_node', null, 'finished_at', null, 'finished_seq', null,
                'duration_ms', null, 'sqlstate', null, 'result_from', null, 'result_of', null)
            || case when v_types[v_i] = 'RACE' then '{"winner": null}'::pg_catalog.jsonb
                    else '{}'::pg_catalog.jsonb end
            || case when v_i = any (v_iterated)
                    then pg_catalog.jsonb_build_object('iteration', v_aux[v_i], 'iter_seq', v_seq,
                             'iter_begins_at', pg_catalog.date_part('epoch', v_clock))
                    else '{}'::pg_catalog.jsonb end
            -- as the worker stamps a RETRY it activates (instance.py, build)
            || case when v_i = any (v_retried)
                    then '{"attempt": 1, "next_attempt_at": null}'::pg_catalog.jsonb
                    else '{}'::pg_catalog.jsonb end);
    end loop;
    foreach v_i in array v_started loop
        v_uids := v_uids || v_ids[v_i];
        v_ustat := v_ustat || 'running'::pg_catalog.text;
        v_udet := v_udet || (pg_catalog.jsonb_build_object(
                'gen', v_gen[v_i], 'seq', v_seq,
                'execution_id', p_instance_id || '::' || v_gen[v_i],
                'queued_at', v_ts, 'started_at', v_ts, 'finished_at', null, 'duration_ms', null,
                'sqlstate', null)
            || case when v_gen[v_i] > 1
                    then '{"branch": null, "winner": null, "decided_seq": null, "abandoned": null, "error_node": null}'::pg_catalog.jsonb
                    else '{}'::pg_catalog.jsonb end
            || case when v_types[v_i] = 'LOOP'
                    then pg_catalog.jsonb_build_object('iteration', 1, 'iter_seq', v_seq,
                             'iter_begins_at', pg_catalog.date_part('epoch', v_clock))
                    when v_types[v_i] = 'RETRY'
                    then pg_catalog.jsonb_build_object('attempt', 1, 'iter_seq', v_seq,
                             'last_error', null, 'last_error_node', null, 'next_attempt_at', null,
                             'max_attempts', (df._try_jsonb(v_queries[v_i]) -> 'max_attempts'))
                    else '{}'::pg_catalog.jsonb end);
        -- an IF that takes an arm now says which (readers show the other arm skipped)
        v_x := v_parent[v_i];
        if v_x > 0 and v_types[v_x] = 'IF' and v_cond[v_x] <> v_i then
            v_bids := v_bids || v_ids[v_x];
            v_bdet := v_bdet || pg_catalog.jsonb_build_object(
                'branch', case when v_i = v_left[v_x] then 'then' else 'else' end,
                'decided_seq', v_seq);
        end if;
        -- and a task, as the worker makes them (_task_for)
        continue when v_types[v_i] <> all (c_leaves)
                      and not (v_types[v_i] = 'IF' and v_cond[v_i] = -2);
        v_cfg := case when v_types[v_i] = any ('{WAIT_SCHEDULE,SIGNAL}'::pg_catalog.text[])
                      then df._try_jsonb(v_queries[v_i]) end;
        v_tids := v_tids || v_ids[v_i];
        v_tgen := v_tgen || v_gen[v_i]::pg_catalog.int4;
        v_tkind := v_tkind || case v_types[v_i] when 'SLEEP' then 'timer' when 'WAIT_SCHEDULE' then 'timer'
                                                when 'SIGNAL' then 'signal' else 'run' end;
        v_tdue := v_tdue || case v_types[v_i]
            when 'SLEEP' then v_clock + pg_catalog.make_interval(
                                  secs => coalesce(pg_catalog.btrim(v_queries[v_i]), '0')::pg_catalog.float8)
            when 'WAIT_SCHEDULE' then @engine@._cron_next_v1(v_cfg ->> 'cron_expr', v_clock)
            else v_clock end;
        v_tdead := v_tdead || case when v_types[v_i] = 'SIGNAL'
                                        and pg_catalog.jsonb_typeof(v_cfg -> 'timeout_seconds') = 'number'
                                   then v_clock + pg_catalog.make_interval(
                                            secs => (v_cfg ->> 'timeout_seconds')::pg_catalog.float8) end;
    end loop;
    update df.nodes n
    set status = u.st, result = null,
        status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb) || u.det,
        updated_at = pg_catalog.now()
    from (select distinct on (x.id) x.id, x.st, x.det
          from rows from (pg_catalog.unnest(v_uids), pg_catalog.unnest(v_ustat),
                         pg_catalog.unnest(v_udet)) with ordinality x(id, st, det, ord)
          order by x.id, x.ord desc) u
    where n.instance_id = p_instance_id and n.id = u.id;
    update df.nodes n
    set status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb) || u.det
    from rows from (pg_catalog.unnest(v_bids), pg_catalog.unnest(v_bdet)) u(id, det)
    where n.instance_id = p_instance_id and n.id = u.id;

    -- a FOREACH (df.foreach) re-activated keeps its stored rows and its completed rows'
    -- results; its failed and cancelled bodies are restarted (38_foreach.sql)
    foreach v_i in array v_started loop
        if v_types[v_i] = 'FOREACH' then
            perform @engine@._foreach_restarted_v1(p_instance_id, v_ids[v_i], v_gen[v_i]::pg_catalog.int4);
        end if;
    end loop;

    -- 6. the tasks
    insert into @engine@.tasks (instance_id, node_id, gen, kind, due_at, deadline, submitted_by,
                                database)
    select p_instance_id, t.node_id, t.gen, t.kind, t.due_at, t.deadline, v_inst.submitted_by,
           v_inst.database
    from rows from (pg_catalog.unnest(v_tids), pg_catalog.unnest(v_tgen), pg_catalog.unnest(v_tkind),
                    pg_catalog.unnest(v_tdue), pg_catalog.unnest(v_tdead))
         as t(node_id, gen, kind, due_at, deadline);

    -- 7. named results: kept when the run ended (since schema 5); a run that ended under an
    --    older schema lost them, so each missing name gets its latest completed value again
    insert into @engine@.results as r (instance_id, name, value, seq)
    select distinct on (n.result_name) p_instance_id, n.result_name,
           df._node_result(p_instance_id, n.id), v_seq
    from df.nodes n
    where n.instance_id = p_instance_id and n.result_name is not null
      and n.status = 'completed'
    order by n.result_name,
             case when pg_catalog.jsonb_typeof(n.status_details -> 'finished_seq') = 'number'
                  then (n.status_details ->> 'finished_seq')::pg_catalog.int8 end desc nulls last,
             n.updated_at desc
    on conflict (instance_id, name) do nothing;

    update df.instances i
    set status = case when v_done then 'completed' else 'running' end,
        updated_at = pg_catalog.now(),
        completed_at = case when v_done then pg_catalog.now() end
    where i.id = p_instance_id;
    perform pg_catalog.pg_notify('pgdurable_work', '');  -- no payload: LISTEN is open to all
    return p_instance_id;
end
$$;

-- The past runs of an instance (the current one is df.instance_runs' own last row): the
-- caller's own instances only. The last row returned is the current run's start and, for
-- a cancelled one, the cancel reason (status and end come from df.instances).
create function @engine@._run_history_v1(p_instance_id varchar)
returns table (run integer, status text, started_at timestamptz, ended_at timestamptz,
               error jsonb)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_owner   pg_catalog.regrole;
    v_created pg_catalog.timestamptz;
begin
    select i.submitted_by, i.created_at into v_owner, v_created
    from df.instances i where i.id = p_instance_id;
    if v_owner is null or not @engine@._may_act(v_owner) then
        raise exception 'Instance not found or access denied: %', p_instance_id using errcode = 'P0002';
    end if;
    return query
    select h.run, h.status, h.started_at, h.ended_at, h.error
    from @engine@.run_history h
    where h.instance_id = p_instance_id
    union all
    select coalesce((select pg_catalog.max(h.run) from @engine@.run_history h
                     where h.instance_id = p_instance_id), 0) + 1,
           null::pg_catalog.text,
           coalesce((select h.restarted_at from @engine@.run_history h
                     where h.instance_id = p_instance_id
                     order by h.run desc limit 1), v_created),
           null::pg_catalog.timestamptz,
           (select pg_catalog.to_jsonb(r.cancel_reason) from @engine@.runs r
            where r.instance_id = p_instance_id)
    order by 1;
end
$$;

-- Restart a failed or cancelled instance of the caller from where it stopped: completed steps
-- keep their results and do not run again; the rest runs. Returns the instance id.
create function df.restart(instance_id text) returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
begin
    -- visibility under RLS is the ownership check users see
    if not exists (select 1 from df.instances i where i.id = instance_id) then
        raise exception 'Instance not found or access denied: %', instance_id using errcode = 'P0002';
    end if;
    return @engine@._restart_v1(instance_id);
end;
$$;

-- Every run of an instance, oldest first: one per restart, then the current one. error is
-- what df.error showed when a run failed ({"node_id", "node_type", "error", "sqlstate"}), or
-- {"error": "cancelled: <reason>"} for a cancelled run; NULL while it runs or completed.
create function df.instance_runs(instance_id text)
returns table (run integer, status text, started_at timestamptz, ended_at timestamptz,
               error jsonb)
language plpgsql stable strict
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_inst record;
begin
    select i.id, i.status, i.completed_at into v_inst from df.instances i where i.id = $1;
    if v_inst.id is null then
        raise exception 'Instance not found or access denied: %', $1 using errcode = 'P0002';
    end if;
    return query
    select h.run, coalesce(h.status, v_inst.status), h.started_at,
           case when h.status is not null then h.ended_at
                when v_inst.status in ('completed', 'failed', 'cancelled') then v_inst.completed_at end,
           case when h.status is not null then h.error
                when v_inst.status = 'failed' then df.error(v_inst.id)
                when v_inst.status = 'cancelled' then jsonb_build_object(
                    'node_id', null, 'node_type', null, 'sqlstate', null,
                    'error', 'cancelled: ' || coalesce(h.error #>> '{}', 'status set to cancelled')) end
    from @engine@._run_history_v1(v_inst.id) h
    order by h.run;
end;
$$;
