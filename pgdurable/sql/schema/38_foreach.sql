-- pgdurable schema, part 38: df.foreach, a durable FOREACH (docs/foreach.md; not in pg_durable).
-- One file for the feature (~600 lines): its DSL checks, engine functions and triggers share
-- the lock order described below and are read together. Named 38 so it is applied before
-- 40_inspect.sql, whose SQL functions show a FOREACH's progress.
--
--   df.foreach(rows, body, max_parallel)  the DSL: a FOREACH node (a leaf to the scheduler)
--   df._foreach_config / _foreach_problem  its config, checked (df.foreach, df.start)
--   @engine@._step_foreach_rows_v1   the rows query's rows stored, in its step's transaction
--   @engine@._foreach_tick_v1        one tick of a FOREACH task: start bodies, fail, complete
--                                    or park (the worker, pgdurable/steps/foreach_step.py)
--   @engine@._foreach_cancel_v1      cancel the running bodies of a FOREACH
--   @engine@._foreach_reap_v1        the maintenance pass: bodies of FOREACHs that stopped
--   @engine@._foreach_restarted_v1   df.restart of the parent: rows kept, failed bodies restarted
--   (@engine@._foreach_progress_v1, k/n for df.explain and df.instance_nodes: 40_inspect.sql)
--   two triggers: a body (child instance) that ends wakes its FOREACH; a FOREACH node that
--   stops (failed, cancelled, abandoned) cancels its running bodies
--
-- How it runs. The rows query runs once per activation as a step of the instance's owner
-- (its runner, like a SQL step) and its rows are stored with ordinals 1..n in the same
-- transaction (@engine@.foreach_runs / foreach_items, 00_tables.sql). Each row's body runs as
-- a child instance of the same owner (database and vars inherited; the row as the named
-- result `item`, and the parent's named results the body refers to), at most max_parallel at
-- a time. A child that ends updates its row and wakes the FOREACH's parked task; the task's
-- next tick starts more, fails the FOREACH on the first failed row (the worker cancels the
-- running ones) or completes it with {"rows": [results in row order], "row_count": n},
-- assembled here. Lock order: a tick holds the FOREACH's task row and never waits on a
-- child's rows but for one that has ended (a restart); a child that ends holds its own runs
-- row and waits on its parent's task and item rows; cancelling children from a parent's
-- transaction takes their runs rows with SKIP LOCKED (what it skips, the reaper cancels),
-- so the two never wait on each other in a cycle.

------------------------------------------------------------------------------------------
-- the DSL
------------------------------------------------------------------------------------------

-- A df.foreach body validated and flattened as df.start does a graph, but for its $name
-- references: it refers to $item and to its workflow's names, which it does not define
-- (df._check_refs is told so for this call).
create function df._foreach_flatten(p_body jsonb) returns jsonb
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_old  pg_catalog.text := pg_catalog.current_setting('pgdurable.foreach_body', true);
    v_flat pg_catalog.jsonb;
begin
    perform pg_catalog.set_config('pgdurable.foreach_body', 'on', true);
    begin
        v_flat := df._graph_flatten(p_body);
    exception when others then
        perform pg_catalog.set_config('pgdurable.foreach_body', coalesce(v_old, ''), true);
        raise;
    end;
    perform pg_catalog.set_config('pgdurable.foreach_body', coalesce(v_old, ''), true);
    return v_flat;
end
$$;

-- A FOREACH node's config (the text stored in its query), after checking every argument:
-- 22023 naming the argument. max_parallel is at most 1000 (more would be a thundering herd
-- of instances, not parallelism the engine could run).
-- PARALLEL RESTRICTED, not SAFE like the other constructors: validating the body sets a
-- setting for the call (df._foreach_flatten), which a parallel worker may not.
create function df._foreach_config(p_rows text, p_body text, p_max_parallel integer)
returns text
language plpgsql immutable parallel restricted
set search_path = pg_catalog, pg_temp
as $$
declare
    v_body pg_catalog.jsonb;
    v_rows pg_catalog.jsonb;
begin
    if p_rows is null then
        raise exception using errcode = '22023', message = 'df.foreach: rows must not be NULL',
            hint = 'Pass the SQL query whose rows the body runs for, e.g. ''select id from orders''.';
    end if;
    if pg_catalog.btrim(p_rows, E' \t\r\n') = '' then
        raise exception using errcode = '22023', message = 'df.foreach: rows must be a SQL query, got an empty text';
    end if;
    v_rows := df._try_jsonb(p_rows);
    if pg_catalog.jsonb_typeof(v_rows) = 'object' and v_rows ? 'node_type' then
        raise exception using errcode = '22023',
            message = 'df.foreach: rows must be a SQL query, not a graph value',
            hint = 'Pass the query text itself (''select …''), not df.sql(…).';
    end if;
    if p_rows !~* '^[\s(]*(select|with|values|table)\M'
       and not (p_rows ~* '^[\s(]*(insert|update|delete|merge)\M' and p_rows ~* '\mreturning\M') then
        raise exception using errcode = '22023',
            message = pg_catalog.format('df.foreach: rows must be a query that returns rows '
                                        '(SELECT, WITH, VALUES, TABLE, or a DML statement with '
                                        'RETURNING), got %s', pg_catalog.left(p_rows, 60));
    end if;
    if pg_catalog.octet_length(p_rows) > 1048576 then
        raise exception using errcode = '22023',
            message = pg_catalog.format('df.foreach: rows is %s bytes, at most 1048576',
                                        pg_catalog.octet_length(p_rows));
    end if;
    if p_body is null then
        raise exception using errcode = '22023', message = 'df.foreach: body must not be NULL',
            hint = 'Pass the graph run for each row, e.g. df.sql(''insert into t values ($item.id)'').';
    end if;
    -- a plain SQL text is a SQL step, as everywhere else in the DSL (df._node)
    begin
        v_body := df._try_jsonb(df._node(p_body));
    exception when sqlstate '22023' then
        raise exception using errcode = '22023',
            message = 'df.foreach: body is not a valid graph: ' || sqlerrm;
    end;
    if pg_catalog.jsonb_typeof(v_body) is distinct from 'object' or not v_body ? 'node_type' then
        raise exception using errcode = '22023',
            message = pg_catalog.format('df.foreach: body must be a graph value (built with '
                                        'df.sql, ~>, df.join, df.retry, …) or a SQL statement, '
                                        'got %s', pg_catalog.left(p_body, 60));
    end if;
    begin
        perform df._foreach_flatten(v_body);
    exception when sqlstate '22023' or sqlstate '54000' then
        raise exception using errcode = '22023',
            message = 'df.foreach: body is not a valid graph: ' || sqlerrm;
    end;
    if p_max_parallel is null then
        raise exception using errcode = '22023', message = 'df.foreach: max_parallel must not be NULL',
            hint = 'Leave it out for 10.';
    end if;
    if p_max_parallel < 1 or p_max_parallel > 1000 then
        raise exception using errcode = '22023',
            message = pg_catalog.format('df.foreach: max_parallel must be from 1 to 1000, got %s',
                                        p_max_parallel),
            hint = 'It is how many bodies run at once; 1000 is the most the engine allows.';
    end if;
    return '{"rows":' || pg_catalog.to_json(p_rows)::pg_catalog.text
        || ',"body":' || v_body::pg_catalog.text
        || ',"max_parallel":' || p_max_parallel::pg_catalog.text || '}';
end
$$;

-- Run body (a graph value) once per row of the query rows, at most max_parallel at a time,
-- each as a child instance with $item (the row as a JSON object) and $item.col; the result is
-- {"rows": [each body's result, in the rows' order], "row_count": n}. The first body that
-- fails fails the FOREACH, naming its row (docs/foreach.md). Every argument is checked here:
-- NULL is an error naming it.
create function df.foreach(rows text, body text, max_parallel integer default 10) returns text
language plpgsql immutable parallel restricted
set search_path = pg_catalog, pg_temp
as $$
begin
    return df._mk('FOREACH', df._foreach_config(rows, body, max_parallel), null, null, null, null);
end
$$;

-- What is wrong with a FOREACH node's stored config, NULL when nothing (df.start and
-- @engine@._enqueue_v1 validate hand-written rows with it).
create function df._foreach_problem(p_query text) returns text
language plpgsql immutable parallel restricted
set search_path = pg_catalog, pg_temp
as $$
declare
    v_cfg pg_catalog.jsonb := df._try_jsonb(p_query);
begin
    if pg_catalog.jsonb_typeof(v_cfg) is distinct from 'object'
       or pg_catalog.jsonb_typeof(v_cfg -> 'rows') is distinct from 'string'
       or pg_catalog.jsonb_typeof(v_cfg -> 'body') is distinct from 'object'
       or pg_catalog.jsonb_typeof(v_cfg -> 'max_parallel') is distinct from 'number' then
        return 'FOREACH config needs rows (a query), body (a graph) and max_parallel (a number) '
               '(build it with df.foreach)';
    end if;
    if (v_cfg ->> 'max_parallel') !~ '^[0-9]{1,9}$' then
        return pg_catalog.format('df.foreach: max_parallel must be from 1 to 1000, got %s',
                                 v_cfg ->> 'max_parallel');
    end if;
    perform df._foreach_config(v_cfg ->> 'rows', (v_cfg -> 'body')::pg_catalog.text,
                               (v_cfg ->> 'max_parallel')::pg_catalog.int4);
    return null;
exception
    when sqlstate '22023' then
        return sqlerrm;
end
$$;

------------------------------------------------------------------------------------------
-- the engine
------------------------------------------------------------------------------------------

-- The rows of a FOREACH activation, stored in the transaction of the step that ran its rows
-- query (exactly once: a crash before the commit loses both, and the query runs again).
-- Called in a step session, behind its capability; fenced by the task's lease and gen
-- (returns -1: the step's transaction must roll back). p_rows: the runner's rows as a JSON
-- array; a statement without result rows is refused (22023). Replaces the rows of an earlier
-- activation (a loop's previous iteration). Returns the row count.
create function @engine@._step_foreach_rows_v1(p_cap text, p_owner text, p_instance varchar,
                                               p_node varchar, p_gen integer, p_rows jsonb)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_inst  record;
    v_cfg   pg_catalog.jsonb;
    v_body  pg_catalog.jsonb;
    v_n     pg_catalog.int4;
begin
    perform @engine@._cap_check_v1(p_cap);
    perform 1 from @engine@.tasks t
    where t.instance_id operator(pg_catalog.=) p_instance
      and t.node_id operator(pg_catalog.=) p_node
      and t.gen operator(pg_catalog.=) p_gen
      and t.lease_owner operator(pg_catalog.=) p_owner
    for update;
    if not found then
        return -1;
    end if;
    if pg_catalog.jsonb_typeof(p_rows) is distinct from 'array'
       or exists (select 1 from pg_catalog.jsonb_array_elements(p_rows) e
                  where pg_catalog.jsonb_typeof(e) operator(pg_catalog.<>) 'object') then
        raise exception 'df.foreach: the rows query returned no result rows (it ran as a statement without a result set); rows must be a query'
            using errcode = '22023',
                  hint = 'a DML statement needs RETURNING to give rows';
    end if;
    v_n := pg_catalog.jsonb_array_length(p_rows);
    if v_n operator(pg_catalog.>) 1000000 then
        raise exception 'df.foreach: the rows query returned % rows, at most 1000000', v_n
            using errcode = '54000';
    end if;
    select i.label, i.submitted_by into v_inst from df.instances i
    where i.id operator(pg_catalog.=) p_instance;
    select df._try_jsonb(n.query) into v_cfg from df.nodes n
    where n.instance_id operator(pg_catalog.=) p_instance and n.id operator(pg_catalog.=) p_node;
    v_body := df._foreach_flatten(v_cfg -> 'body');
    delete from @engine@.foreach_runs f
    where f.instance_id operator(pg_catalog.=) p_instance and f.node_id operator(pg_catalog.=) p_node;
    insert into @engine@.foreach_runs (instance_id, node_id, gen, row_count, max_parallel, body,
                                       names, label, submitted_by)
    values (p_instance, p_node, p_gen, v_n, (v_cfg ->> 'max_parallel')::pg_catalog.int4, v_body,
            -- the names the body's texts refer to as $name (a superset: any $name anywhere)
            coalesce((select pg_catalog.array_agg(distinct m[1])
                      from pg_catalog.regexp_matches((v_cfg -> 'body')::pg_catalog.text,
                                                     '\$([A-Za-z_][A-Za-z0-9_]*)', 'g') m
                      where m[1] operator(pg_catalog.<>) 'item'), '{}'),
            pg_catalog.left(coalesce(v_inst.label, p_instance), 900) operator(pg_catalog.||)
                ' foreach ' operator(pg_catalog.||) p_node,
            v_inst.submitted_by);
    insert into @engine@.foreach_items (instance_id, node_id, ord, item, submitted_by)
    select p_instance, p_node, e.ord::pg_catalog.int4, e.item, v_inst.submitted_by
    from pg_catalog.jsonb_array_elements(p_rows) with ordinality e(item, ord);
    return v_n;
end
$$;
-- the step role calls it in the rows query's transaction (90_grants.sql: the other _step_*)
grant execute on function
    @engine@._step_foreach_rows_v1(text, text, varchar, varchar, integer, jsonb) to pgdurable_step;

-- Start one row's body: a child instance of the FOREACH's owner, as df.start writes one (the
-- flattened body stored with the rows), its start task queued. Internal (the tick).
create function @engine@._foreach_spawn_v1(p_instance varchar, p_node varchar, p_ord integer)
returns varchar
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_run   record;
    v_item  record;
    v_db    pg_catalog.text;
    v_root  pg_catalog.varchar;
    v_id    pg_catalog.varchar;
    v_tries pg_catalog.int4 := 0;
begin
    select f.* into v_run from @engine@.foreach_runs f
    where f.instance_id = p_instance and f.node_id = p_node;
    select x.item into v_item from @engine@.foreach_items x
    where x.instance_id = p_instance and x.node_id = p_node and x.ord = p_ord;
    select i.database into v_db from df.instances i where i.id = p_instance;
    v_root := v_run.body -> 0 ->> 'id';
    loop
        v_tries := v_tries + 1;
        insert into df.instances (id, label, root_node, submitted_by, database)
        values (pg_catalog.right(pg_catalog.replace(pg_catalog.gen_random_uuid()::pg_catalog.text,
                                                    '-', ''), 8),
                v_run.label || ' row ' || p_ord, v_root, v_run.submitted_by, v_db)
        on conflict do nothing
        returning id into v_id;
        exit when v_id is not null;
        if v_tries > 10 then
            raise exception 'could not reserve an instance id after 10 attempts' using errcode = '55000';
        end if;
    end loop;
    insert into df.nodes (id, instance_id, node_type, query, result_name, left_node, right_node,
                          submitted_by, database)
    select n.id, v_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
           v_run.submitted_by, v_db
    from pg_catalog.jsonb_to_recordset(v_run.body)
         as n(id pg_catalog.varchar, node_type pg_catalog.text, query pg_catalog.text,
              result_name pg_catalog.text, left_node pg_catalog.varchar,
              right_node pg_catalog.varchar);
    insert into @engine@.runs (instance_id, vars)
    select v_id, r.vars from @engine@.runs r where r.instance_id = p_instance;
    -- $item, and the parent's named results the body refers to (not all of them: a large
    -- result times thousands of rows)
    insert into @engine@.results (instance_id, name, value, seq)
    select v_id, r.name, r.value, 0 from @engine@.results r
    where r.instance_id = p_instance and r.name = any (v_run.names)
    union all
    select v_id, 'item', v_item.item, 1;
    insert into @engine@.tasks (instance_id, node_id, gen, kind, due_at, submitted_by, database)
    values (v_id, v_root, 0, 'start', pg_catalog.now(), v_run.submitted_by, v_db);
    update @engine@.foreach_items x set child_id = v_id, status = 'running', result = null,
                                        error = null
    where x.instance_id = p_instance and x.node_id = p_node and x.ord = p_ord;
    return v_id;
end
$$;

-- A child's end, as its row records it: its status, its result (completed) or error.
create function @engine@._foreach_record_v1(p_child varchar) returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_inst record;
begin
    select i.id, i.status, i.root_node, i.submitted_by into v_inst
    from df.instances i where i.id = p_child;
    if v_inst.status is null or v_inst.status not in ('completed', 'failed', 'cancelled') then
        return;
    end if;
    update @engine@.foreach_items x
    set status = v_inst.status,
        result = case when v_inst.status = 'completed'
                      then coalesce(df._node_result(v_inst.id, v_inst.root_node),
                                    'null'::pg_catalog.jsonb) end,
        error = case v_inst.status
                    when 'failed' then coalesce(df.error(v_inst.id) ->> 'error', 'failed')
                    when 'cancelled' then 'cancelled: ' || coalesce(
                        (select r.cancel_reason from @engine@.runs r where r.instance_id = v_inst.id),
                        'status set to cancelled') end
    where x.child_id = p_child and x.submitted_by = v_inst.submitted_by
      and x.status = 'running';
end
$$;

-- One tick of a FOREACH task (the worker, foreach_step.py), in one transaction, fenced by
-- the task's lease and gen. Returns (state, detail):
--   'fenced'     the task is not ours (nothing done)
--   'rows'       the rows query has not run for this activation: the worker runs it
--   'failed'     a row's body failed: detail is the FOREACH's error (the worker cancels the
--                running bodies, then fails the node)
--   'completed'  every body completed: detail is the result, assembled here
--   'parked'     bodies started up to max_parallel; the task sleeps until a body ends
--                (detail: 'k/n'); woken by _foreach_child_ended_v1, re-checked every minute
create function @engine@._foreach_tick_v1(p_owner text, p_instance varchar, p_node varchar,
                                          p_gen integer)
returns table (state text, detail text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_run     record;
    v_fail    record;
    v_running pg_catalog.int4;
    v_free    pg_catalog.int4;
    v_ord     pg_catalog.int4;
    v_child   pg_catalog.varchar;
    v_done    pg_catalog.int8;
    v_started pg_catalog.int4 := 0;
begin
    perform 1 from @engine@.tasks t
    where t.instance_id = p_instance and t.node_id = p_node and t.gen = p_gen
      and t.lease_owner = p_owner
    for update;
    if not found then
        return query select 'fenced'::pg_catalog.text, null::pg_catalog.text;
        return;
    end if;
    select f.* into v_run from @engine@.foreach_runs f
    where f.instance_id = p_instance and f.node_id = p_node;
    if not found or v_run.gen <> p_gen then
        return query select 'rows'::pg_catalog.text, null::pg_catalog.text;
        return;
    end if;
    -- children that ended without their row saying so (the trigger is the fast path)
    perform @engine@._foreach_record_v1(x.child_id)
    from @engine@.foreach_items x join df.instances i on i.id = x.child_id
    where x.instance_id = p_instance and x.node_id = p_node and x.status = 'running'
      and i.status in ('completed', 'failed', 'cancelled');
    select x.ord, x.error into v_fail from @engine@.foreach_items x
    where x.instance_id = p_instance and x.node_id = p_node
      and x.status in ('failed', 'cancelled')
    order by x.ord limit 1;
    if found then
        return query select 'failed'::pg_catalog.text,
            pg_catalog.format('df.foreach: row %s of %s failed: %s', v_fail.ord, v_run.row_count,
                              coalesce(v_fail.error, 'failed'));
        return;
    end if;
    select pg_catalog.count(*) into v_running from @engine@.foreach_items x
    where x.instance_id = p_instance and x.node_id = p_node and x.status = 'running';
    v_free := v_run.max_parallel - v_running;
    -- rows of a restarted FOREACH whose bodies failed or were cancelled: df.restart them
    -- (their completed steps are kept); a child pruned meanwhile runs afresh
    for v_ord, v_child in
        select x.ord, x.child_id from @engine@.foreach_items x
        where x.instance_id = p_instance and x.node_id = p_node and x.status = 'restart'
        order by x.ord limit greatest(v_free, 0)
    loop
        if exists (select 1 from df.instances i
                   where i.id = v_child and i.status in ('failed', 'cancelled')) then
            perform @engine@._restart_core_v1(v_child, true);
            update @engine@.foreach_items x set status = 'running', result = null, error = null
            where x.instance_id = p_instance and x.node_id = p_node and x.ord = v_ord;
        else
            perform @engine@._foreach_spawn_v1(p_instance, p_node, v_ord);
        end if;
        v_free := v_free - 1;
        v_started := v_started + 1;
    end loop;
    for v_ord in
        select x.ord from @engine@.foreach_items x
        where x.instance_id = p_instance and x.node_id = p_node and x.status = 'pending'
        order by x.ord limit greatest(v_free, 0)
    loop
        perform @engine@._foreach_spawn_v1(p_instance, p_node, v_ord);
        v_started := v_started + 1;
    end loop;
    if v_started > 0 then
        perform pg_catalog.pg_notify('pgdurable_work', '');
    end if;
    if not exists (select 1 from @engine@.foreach_items x
                   where x.instance_id = p_instance and x.node_id = p_node
                     and x.status <> 'completed') then
        return query
        select 'completed'::pg_catalog.text,
               pg_catalog.jsonb_build_object(
                   'rows', coalesce((select pg_catalog.jsonb_agg(x.result order by x.ord)
                                     from @engine@.foreach_items x
                                     where x.instance_id = p_instance and x.node_id = p_node),
                                    '[]'::pg_catalog.jsonb),
                   'row_count', v_run.row_count)::pg_catalog.text;
        return;
    end if;
    -- rows done, counted by the rows not done (the partial index: a tick costs what is
    -- open, not what is done)
    select v_run.row_count - pg_catalog.count(*) into v_done from @engine@.foreach_items x
    where x.instance_id = p_instance and x.node_id = p_node and x.status <> 'completed';
    update @engine@.tasks t
    set lease_owner = null, lease_expires_at = null, attempts = 0,
        due_at = pg_catalog.now() + '60 seconds'::pg_catalog.interval
    where t.instance_id = p_instance and t.node_id = p_node and t.gen = p_gen;
    return query select 'parked'::pg_catalog.text, v_done || '/' || v_run.row_count;
end
$$;

-- Cancel a child instance (the writes of df.cancel, @engine@._cancel_v1, without its
-- caller's check: the engine cancels the bodies of a FOREACH that stopped). Skips a child
-- whose runs row is locked (a checkpoint of it in progress): false, try again later.
create function @engine@._foreach_cancel_child_v1(p_child varchar, p_reason text)
returns boolean
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    perform 1 from @engine@.runs r where r.instance_id = p_child for update skip locked;
    if not found then
        return not exists (select 1 from @engine@.runs r where r.instance_id = p_child);
    end if;
    perform 1 from df.instances i where i.id = p_child for update;
    if exists (select 1 from df.instances i
               where i.id = p_child and i.status in ('completed', 'failed', 'cancelled')) then
        perform @engine@._foreach_record_v1(p_child);
        return true;
    end if;
    update df.instances i set status = 'cancelled', updated_at = pg_catalog.now(),
                              completed_at = pg_catalog.now()
    where i.id = p_child;
    update @engine@.runs r set cancel_reason = p_reason where r.instance_id = p_child;
    delete from @engine@.tasks t where t.instance_id = p_child;
    update df.nodes n
    set status = 'failed', result = pg_catalog.to_jsonb('cancelled: ' || p_reason),
        status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb)
                         || '{"abandoned": true}'::pg_catalog.jsonb,
        updated_at = pg_catalog.now()
    where n.instance_id = p_child and n.status = 'running';
    perform @engine@._foreach_record_v1(p_child);
    perform pg_catalog.pg_notify('pgdurable_cancel', '');
    return true;
end
$$;

-- Cancel the running bodies of a FOREACH; returns how many could not be (busy: retried).
create function @engine@._foreach_cancel_v1(p_instance varchar, p_node varchar, p_reason text)
returns integer
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_child pg_catalog.varchar;
    v_left  pg_catalog.int4 := 0;
begin
    for v_child in
        select x.child_id from @engine@.foreach_items x
        where x.instance_id = p_instance and x.node_id = p_node and x.status = 'running'
        order by x.ord
    loop
        if not @engine@._foreach_cancel_child_v1(v_child, p_reason) then
            v_left := v_left + 1;
        end if;
    end loop;
    return v_left;
end
$$;

-- The maintenance pass: running bodies of a FOREACH that is no longer running (abandoned,
-- cancelled or failed while one of its bodies was busy) are cancelled now. Returns how many.
create function @engine@._foreach_reap_v1(p_limit integer) returns integer
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    r   record;
    v_n pg_catalog.int4 := 0;
begin
    for r in
        select x.child_id, x.instance_id, x.node_id from @engine@.foreach_items x
        join @engine@.foreach_runs f on f.instance_id = x.instance_id and f.node_id = x.node_id
        left join df.nodes n on n.instance_id = x.instance_id and n.id = x.node_id
        where x.status = 'running'
          and n.status is distinct from 'running'
        limit p_limit
    loop
        if @engine@._foreach_cancel_child_v1(
               r.child_id, pg_catalog.format('its FOREACH %s of instance %s stopped',
                                             r.node_id, r.instance_id)) then
            v_n := v_n + 1;
        end if;
    end loop;
    return v_n;
end
$$;

-- df.restart of an instance with a FOREACH that did not complete (70_restart.sql): the
-- stored rows move to its new activation (the rows query does not run again); completed
-- rows keep their results; failed and cancelled bodies are df.restart-ed by the next tick.
create function @engine@._foreach_restarted_v1(p_instance varchar, p_node varchar, p_gen integer)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    update @engine@.foreach_runs f set gen = p_gen
    where f.instance_id = p_instance and f.node_id = p_node;
    -- a body still running (its cancel is pending): cancel it now if it can be, then restart
    perform @engine@._foreach_cancel_v1(p_instance, p_node, 'its FOREACH was restarted');
    update @engine@.foreach_items x set status = 'restart'
    where x.instance_id = p_instance and x.node_id = p_node
      and x.status in ('failed', 'cancelled') and x.child_id is not null;
end
$$;

------------------------------------------------------------------------------------------
-- triggers
------------------------------------------------------------------------------------------

-- A body (a child instance of a FOREACH) ended: its row records it and the FOREACH's task
-- wakes. Fires only for instances labelled as children (the label is set by the engine and
-- no tenant may update it); whatever fires it, only a row whose child is this very instance
-- of the same owner changes.
create function @engine@._foreach_child_ended_v1() returns trigger
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_x record;
begin
    select x.instance_id, x.node_id into v_x from @engine@.foreach_items x
    where x.child_id = new.id and x.submitted_by = new.submitted_by and x.status = 'running';
    if not found then
        return null;
    end if;
    perform @engine@._foreach_record_v1(new.id);
    update @engine@.tasks t set due_at = pg_catalog.now()
    where t.instance_id = v_x.instance_id and t.node_id = v_x.node_id;
    perform pg_catalog.pg_notify('pgdurable_work', '');
    return null;
end
$$;

create trigger instances_foreach_child_ended after update of status on df.instances
    for each row
    when (old.status is distinct from new.status
          and new.status in ('completed', 'failed', 'cancelled')
          and new.label like '% foreach % row %')
    execute function @engine@._foreach_child_ended_v1();

-- A FOREACH node stopped running without completing (its own failure, df.cancel of its
-- instance, abandoned by a RACE or a failed JOIN): its running bodies are cancelled (a busy
-- one by the reaper, moments later).
create function @engine@._foreach_stopped_v1() returns trigger
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if exists (select 1 from df.instances i
               where i.id = new.instance_id and i.submitted_by = new.submitted_by) then
        perform @engine@._foreach_cancel_v1(
            new.instance_id, new.id,
            pg_catalog.format('its FOREACH %s of instance %s stopped: %s', new.id,
                              new.instance_id, pg_catalog.left(new.result #>> '{}', 200)));
    end if;
    return null;
end
$$;

create trigger nodes_foreach_stopped after update of status on df.nodes
    for each row
    when (old.node_type = 'FOREACH' and old.status = 'running' and new.status = 'failed')
    execute function @engine@._foreach_stopped_v1();
