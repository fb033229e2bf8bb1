-- pgdurable schema, part 40: inspection and administration.
--
--   df._node_tree               read-time tree walk: pre-order path + inferred status (ARCH §4)
--   df.instance_nodes           12 columns (+ the legacy (text, integer) overload)
--   df.list_instances           basic and paged (opaque keyset cursor) overloads
--   df.instance_info / df.instance_executions / df.metrics
--   df.explain                  live instance tree or dry run of a graph / DSL text / SQL
--   df._visible                 tenants' text with its control characters shown (explain)
--   df.setvar/getvar/unsetvar/clearvars, df.version/run/target_database/duroxide_schema
--   df.workers                  view over @engine@.workers
--   df.grant_usage / df.revoke_usage
--
-- Everything here is SECURITY INVOKER and reads df.instances/df.nodes under RLS, so a role
-- sees only its own instances; df.metrics (engine-wide, admin-only) is the one definer.
-- Every function pins search_path = pg_catalog, pg_temp and casts/declares with pg_catalog
-- types (why: the 30_control.sql header).
--
-- Our choices where docs/api.md leaves room (documented in docs too):
--   function_name        always 'pgdurable' (the orchestration name; labels are in `label`)
--   execution_count      highest generation / loop iteration any node reports, 0 before a
--                        worker loaded the instance
--   output               the root node's result (JSON text), whatever the status
--   result               as df.nodes held it when composites stored copies: a completed
--                        composite's reference is resolved (df._node_result, 30_control.sql),
--                        and the worker's own keys (result_from, result_of, result_bytes) are
--                        left out of status_details
--   execution_id         a bigint, as in pg_durable: the activation generation ("gen" in
--                        status_details; a node's k-th activation is in execution k), one
--                        row per generation in instance_executions (df._execution_id)
--   status words         df's own (pending/running/completed/failed/cancelled) everywhere

------------------------------------------------------------------------------------------
-- inferred status
------------------------------------------------------------------------------------------

-- One row per node of the instance reachable from its root, with its pre-order path and the
-- inferred status (ARCHITECTURE §4):
--   superseded  a node under a LOOP whose seq < that loop's iter_seq reads as pending (under
--               a RETRY likewise: what an earlier, failed attempt left)
--               (inferred_from = the loop); decisions of a superseded IF/RACE/THEN are stale
--               and are not applied to its children
--   skipped     a pending/running node under an IF's untaken arm, right of a THEN whose left
--               failed, under a decided RACE's loser (inferred_from = the deciding ancestor,
--               the outermost one), or of a terminal instance (inferred_from = the root);
--               also a node of a RACE's loser that the worker abandoned when the RACE was
--               decided (failed, "abandoned": true)
-- Everything describes the current iteration of every enclosing LOOP: a node's seq is the
-- checkpoint that last activated it, and an IF's arm (branch) or a RACE's winner counts only
-- when it was decided in that activation (decided_seq or finished_seq >= seq), so a decision
-- left on the row by an earlier iteration is never applied to the re-activated node.
-- The walk stops at depth 300 so hand-written cyclic rows cannot loop forever.
create function df._node_tree(p_instance_id text)
returns table (node_id varchar, path integer[], role text, inferred_status text,
               inferred_from varchar)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    with recursive inst as (
        select i.id, i.root_node, i.status from df.instances i where i.id = p_instance_id
    ), n as (
        select x.id, x.node_type, x.left_node, x.right_node, x.status, x.status_details as sd,
               case when x.node_type in ('IF', 'LOOP', 'JOIN') and x.query like '{%'
                    then df._try_jsonb(x.query) end as qj,
               case when jsonb_typeof(x.status_details -> 'seq') = 'number'
                    then (x.status_details ->> 'seq')::pg_catalog.numeric end as seq,
               -- a LOOP's iteration or a RETRY's attempt began at iter_seq: what ran before
               -- it below that node reads as pending
               case when x.node_type in ('LOOP', 'RETRY')
                         and jsonb_typeof(x.status_details -> 'iter_seq') = 'number'
                    then (x.status_details ->> 'iter_seq')::pg_catalog.numeric end as iter_seq,
               -- false when the row's IF arm / RACE winner was decided in an earlier activation
               coalesce(greatest(
                   case when jsonb_typeof(x.status_details -> 'decided_seq') = 'number'
                        then (x.status_details ->> 'decided_seq')::pg_catalog.numeric end,
                   case when jsonb_typeof(x.status_details -> 'finished_seq') = 'number'
                        then (x.status_details ->> 'finished_seq')::pg_catalog.numeric end)
                   >= (case when jsonb_typeof(x.status_details -> 'seq') = 'number'
                            then (x.status_details ->> 'seq')::pg_catalog.numeric end),
                   true) as fresh,
               x.status = 'failed' and x.status_details -> 'abandoned' = 'true'::pg_catalog.jsonb
                   as abandoned
        from df.nodes x where x.instance_id = p_instance_id
    ), walk(node_id, path, role, depth, skip_from, loop_seq, loop_id) as (
        select i.root_node::pg_catalog.varchar, array[]::pg_catalog.int4[], 'root'::pg_catalog.text,
               1, null::pg_catalog.varchar, null::pg_catalog.numeric, null::pg_catalog.varchar
        from inst i
        union all
        select c.child, w.path || c.ord, c.role, w.depth + 1,
               coalesce(w.skip_from, case when coalesce(p.seq < w.loop_seq, false) then null
                                          else c.skip_here end),
               case when p.iter_seq > coalesce(w.loop_seq, -1) then p.iter_seq else w.loop_seq end,
               case when p.iter_seq > coalesce(w.loop_seq, -1) then p.id else w.loop_id end
        from walk w
        join n p on p.id = w.node_id
        cross join lateral (
            select (p.qj ->> 'condition_node')::pg_catalog.varchar as child, 0 as ord,
                   case p.node_type when 'LOOP' then 'while' else 'condition' end as role,
                   null::pg_catalog.varchar as skip_here
            where p.node_type in ('IF', 'LOOP') and jsonb_typeof(p.qj -> 'condition_node') = 'string'
            union all
            select p.left_node, 1,
                   case p.node_type when 'IF' then 'then' when 'LOOP' then 'body'
                                    when 'THEN' then 'first' when 'RETRY' then 'attempt'
                                    else 'branch 1' end,
                   case when p.fresh and ((p.node_type = 'IF' and p.sd ->> 'branch' = 'else')
                                          or (p.node_type = 'RACE' and p.sd ->> 'winner' <> p.left_node))
                        then p.id end
            where p.left_node is not null
            union all
            select p.right_node, 2,
                   case p.node_type when 'IF' then 'else' when 'THEN' then 'then' else 'branch 2' end,
                   case when (p.fresh and ((p.node_type = 'IF' and p.sd ->> 'branch' = 'then')
                                           or (p.node_type = 'RACE' and p.sd ->> 'winner' <> p.right_node)))
                          or (p.node_type = 'THEN' and exists (select 1 from n l
                                                               where l.id = p.left_node
                                                                 and l.status = 'failed'
                                                                 and not coalesce(l.seq < w.loop_seq, false)))
                        then p.id end
            where p.right_node is not null
            union all
            select e.value::pg_catalog.varchar, 2 + e.ord::pg_catalog.int4, 'branch ' || (2 + e.ord),
                   null::pg_catalog.varchar
            from jsonb_array_elements_text(case when p.node_type = 'JOIN'
                                                     and jsonb_typeof(p.qj -> 'extra_nodes') = 'array'
                                                then p.qj -> 'extra_nodes' end)
                 with ordinality e(value, ord)
        ) c
        where w.depth < 300
    ), placed as (
        select distinct on (w.node_id) w.* from walk w order by w.node_id, w.path
    )
    select x.id, w.path, w.role,
           case when v.open and w.skip_from is not null then 'skipped'
                when v.eff in ('pending', 'running') and i.status in ('completed', 'failed', 'cancelled')
                    then 'skipped'
                -- stopped by df.cancel while running (30_control.sql): skipped, not failed
                when x.abandoned and not v.superseded and i.status = 'cancelled' then 'skipped'
                else v.eff end,
           case when v.open and w.skip_from is not null then w.skip_from
                when v.eff in ('pending', 'running') and i.status in ('completed', 'failed', 'cancelled')
                    then i.root_node
                when x.abandoned and not v.superseded and i.status = 'cancelled' then i.root_node
                when v.superseded then w.loop_id end
    from n x
    cross join inst i
    left join placed w on w.node_id = x.id
    cross join lateral (
        select coalesce(x.seq < w.loop_seq, false) as superseded,
               case when coalesce(x.seq < w.loop_seq, false) then 'pending' else x.status end as eff
    ) v0
    cross join lateral (
        -- open: what a deciding ancestor turns into skipped (never-run, still running, or
        -- abandoned when its branch lost)
        select v0.*, v0.eff in ('pending', 'running') or (x.abandoned and not v0.superseded) as open
    ) v
    order by w.path nulls last, x.id
$$;

-- The execution a node's row belongs to (df.instance_executions): its activation generation,
-- stamped by the worker as "gen" (and inside "execution_id": "<instance>::<gen>"); NULL for a
-- node no worker has activated.
create function df._execution_id(p_details jsonb) returns bigint
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select case
        when p_details ->> 'gen' operator(pg_catalog.~) '^[0-9]{1,18}$'
            then (p_details ->> 'gen')::pg_catalog.int8
        when p_details ->> 'execution_id' operator(pg_catalog.~) '::[0-9]{1,18}$'
            then pg_catalog.substring(p_details ->> 'execution_id', '::([0-9]{1,18})$')::pg_catalog.int8
    end
$$;

-- Progress of a df.foreach FOREACH node for its owner (df.explain, df.instance_nodes; the
-- tables and the rest of it: 38_foreach.sql): NULL before its
-- rows query ran, or for another role's instance.
create function @engine@._foreach_progress_v1(p_instance varchar, p_node varchar)
returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_owner pg_catalog.regrole;
    v_run   record;
    v_c     record;
begin
    select i.submitted_by into v_owner from df.instances i where i.id = p_instance;
    if v_owner is null or not @engine@._may_act(v_owner) then
        return null;
    end if;
    select f.row_count, f.max_parallel into v_run from @engine@.foreach_runs f
    where f.instance_id = p_instance and f.node_id = p_node;
    if not found then
        return null;
    end if;
    select pg_catalog.count(*) filter (where x.status = 'completed') as done,
           pg_catalog.count(*) filter (where x.status = 'running') as running,
           pg_catalog.count(*) filter (where x.status in ('failed', 'cancelled')) as failed
    into v_c
    from @engine@.foreach_items x where x.instance_id = p_instance and x.node_id = p_node;
    return pg_catalog.jsonb_build_object(
        'progress', v_c.done || '/' || v_run.row_count, 'rows_done', v_c.done,
        'rows_running', v_c.running, 'rows_failed', v_c.failed, 'row_count', v_run.row_count);
end
$$;

create function df.instance_nodes(instance_id_param text)
returns table (node_id text, node_type text, query text, result_name text, left_node text,
               right_node text, status text, result text, status_details text,
               inferred_status text, inferred_status_from_ancestor_id text,
               updated_at timestamptz)
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$
    select n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           case when n.status = 'completed'
                     and (n.status_details ? 'result_from' or n.status_details ? 'result_of')
                then df._node_result($1, n.id) else n.result end::pg_catalog.text,
           -- a FOREACH's progress (df.foreach): {"progress": "k/n", "rows_done", …}
           (case when n.node_type = 'FOREACH' and n.status <> 'pending'
                 then coalesce(n.status_details, '{}'::pg_catalog.jsonb)
                      || coalesce(@engine@._foreach_progress_v1(n.instance_id, n.id),
                                  '{}'::pg_catalog.jsonb)
                 else n.status_details end
            - 'result_from' - 'result_of' - 'result_bytes')::pg_catalog.text,
           t.inferred_status, t.inferred_from, n.updated_at
    from df.nodes n
    join df._node_tree($1) t on t.node_id = n.id
    where n.instance_id = $1
    order by t.path nulls last, n.id
$$;

-- Legacy overload (before inferred status existed): the physical columns, every node in tree
-- order, each with the execution its state is from (1 for a node that has not run). The
-- second argument is accepted and ignored, as in pg_durable 0.2.6.
create function df.instance_nodes(instance_id_param text, _last_n_executions integer)
returns table (execution_id bigint, node_id text, node_type text, query text, result_name text,
               left_node text, right_node text, status text, result text,
               updated_at timestamptz)
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(df._execution_id(x.status_details::pg_catalog.jsonb), 1),
           x.node_id, x.node_type, x.query, x.result_name, x.left_node, x.right_node, x.status,
           x.result, x.updated_at
    from df.instance_nodes($1) x
$$;

------------------------------------------------------------------------------------------
-- listing
------------------------------------------------------------------------------------------

-- The paged listing; the basic overload is a projection of it. Keyset pagination on the
-- (created_at desc, id) index order: the cursor is the hex of 'v1:<created_at µs>:<id>' of a
-- page's last row, repeated on every row of the page and NULL on the last page.
create function df.list_instances(status_filter text, limit_count integer, label_filter text,
                                  after_cursor text default null)
returns table (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text, created_at timestamptz,
               completed_at timestamptz, next_cursor text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_max    pg_catalog.int4 := @engine@.setting('list_instances_max_limit', '1000')::pg_catalog.int4;
    v_limit  pg_catalog.int4 := coalesce(limit_count, 100);
    v_plain  pg_catalog.text;
    v_parts  pg_catalog.text[];
    v_at     pg_catalog.timestamptz;
    v_id     pg_catalog.varchar;
begin
    if v_limit < 1 then
        raise exception 'limit_count must be at least 1, got %', v_limit using errcode = '22023';
    end if;
    if v_limit > v_max then
        raise exception 'limit_count % exceeds pg_durable.list_instances_max_limit (%)', v_limit, v_max
            using errcode = '54000', hint = 'page through the results with the paged overload''s after_cursor';
    end if;
    if after_cursor is not null then
        -- printable ASCII only, so the conversion below cannot fail on a forged cursor
        if after_cursor ~ '^([2-6][0-9a-f]|7[0-9a-e])+$' then
            v_plain := convert_from(decode(after_cursor, 'hex'), 'SQL_ASCII');
            v_parts := regexp_match(v_plain, '^v1:(-?[0-9]{1,19}):([0-9a-f]{8})$');
        end if;
        if v_parts is null then
            raise exception 'invalid list_instances cursor %', quote_literal(after_cursor)
                using errcode = '22023', hint = 'pass a next_cursor value returned by df.list_instances';
        end if;
        v_at := 'epoch'::pg_catalog.timestamptz
                + v_parts[1]::pg_catalog.int8 * '1 microsecond'::pg_catalog.interval;
        v_id := v_parts[2];
    end if;
    return query
    with page as (
        select i.id, i.label, i.status, i.created_at, i.completed_at, i.root_node
        from df.instances i
        where (status_filter is null or i.status = status_filter)
          and (label_filter is null or i.label = label_filter)
          and (v_at is null or i.created_at < v_at or (i.created_at = v_at and i.id > v_id))
        order by i.created_at desc, i.id
        limit v_limit + 1
    ), numbered as (
        select p.*, row_number() over (order by p.created_at desc, p.id) as rn,
               count(*) over () as total
        from page p
    )
    select x.id::pg_catalog.text, x.label, 'pgdurable'::pg_catalog.text, x.status,
           -- 0 until a worker stamped a node, then at least 1
           (select case when count(*) = 0 then 0
                        else greatest(1, coalesce(max(greatest(
                            case when jsonb_typeof(n.status_details -> 'gen') = 'number'
                                 then (n.status_details ->> 'gen')::pg_catalog.numeric end,
                            case when jsonb_typeof(n.status_details -> 'iteration') = 'number'
                                 then (n.status_details ->> 'iteration')::pg_catalog.numeric end)), 1))::pg_catalog.int8 end
            from df.nodes n where n.instance_id = x.id and n.status_details is not null),
           df._node_result(x.id, x.root_node)::pg_catalog.text,
           x.created_at, x.completed_at,
           max(case when x.total > v_limit and x.rn = v_limit
                    then encode(convert_to('v1:' || (extract(epoch from x.created_at) * 1000000)::pg_catalog.int8
                                           || ':' || x.id, 'SQL_ASCII'), 'hex') end) over ()
    from numbered x
    where x.rn <= v_limit
    order by x.rn;
end;
$$;

create function df.list_instances(status_filter text default null, limit_count integer default 100)
returns table (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select l.instance_id, l.label, l.function_name, l.status, l.execution_count, l.output
    from df.list_instances($1, $2, null::pg_catalog.text, null::pg_catalog.text) l
$$;

create function df.instance_info(instance_id text)
returns table (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text, idempotency_key text)
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$
    select i.id::pg_catalog.text, i.label, 'pgdurable'::pg_catalog.text,
           '@version@'::pg_catalog.text,
           -- the newest execution (the first row of df.instance_executions); NULL before a
           -- worker activated a node
           (select pg_catalog.max(df._execution_id(n.status_details)) from df.nodes n
            where n.instance_id operator(pg_catalog.=) i.id),
           i.status,
           df._node_result(i.id, i.root_node)::pg_catalog.text,
           i.idempotency_key
    from df.instances i where i.id operator(pg_catalog.=) $1
$$;

-- Executions: a node's k-th activation belongs to execution k (its generation; a loop's body
-- runs once per execution), so the executions of an instance are the distinct generations
-- its nodes report, newest (highest) first. Each node row is counted in the execution of its
-- latest activation. At most limit_count rows (1 to 10,000).
create function df.instance_executions(instance_id text, limit_count integer default 5)
returns table (execution_id bigint, status text, event_count bigint, duration_ms bigint, output text)
language plpgsql stable strict
set search_path = pg_catalog, pg_temp
as $$
begin
    if limit_count < 1 then
        raise exception 'limit_count must be at least 1, got %', limit_count using errcode = '22023';
    end if;
    return query
    select e.id,
           case when bool_or(n.status operator(pg_catalog.=) 'failed') then 'failed'
                when bool_or(n.status operator(pg_catalog.=) any ('{running,pending}'::pg_catalog.text[]))
                    then 'running'
                else 'completed' end::pg_catalog.text,
           pg_catalog.count(*),
           (extract(epoch from pg_catalog.max(f.finished_at) operator(pg_catalog.-) pg_catalog.min(f.started_at))
                operator(pg_catalog.*) 1000)::pg_catalog.int8,
           pg_catalog.max(case when n.id operator(pg_catalog.=) i.root_node
                               then df._node_result(i.id, n.id)::pg_catalog.text end)
    from df.instances i
    join df.nodes n on n.instance_id operator(pg_catalog.=) i.id
    cross join lateral (select df._execution_id(n.status_details) as id) e
    cross join lateral (
        select case when n.status_details ->> 'started_at' operator(pg_catalog.~) '^\d{4}-'
                    then (n.status_details ->> 'started_at')::pg_catalog.timestamptz end as started_at,
               case when n.status_details ->> 'finished_at' operator(pg_catalog.~) '^\d{4}-'
                    then (n.status_details ->> 'finished_at')::pg_catalog.timestamptz end as finished_at
    ) f
    where i.id operator(pg_catalog.=) instance_executions.instance_id and e.id is not null
    group by e.id
    order by e.id desc
    limit least(limit_count, 10000);
end;
$$;

-- Engine-wide counters (admin-only: PUBLIC EXECUTE is revoked in 90_grants.sql, so the
-- definer's view of every role's rows is reachable only by roles given it explicitly).
--   total_executions  distinct execution ids stamped on nodes (≈ activations of scopes)
--   total_events      node state changes recorded by workers + signals in the inbox
create function df.metrics()
returns table (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
language sql stable strict security definer
set search_path = pg_catalog, pg_temp
as $$
    select (select pg_catalog.count(*) from df.instances i),
           (select pg_catalog.count(*) from df.instances i where i.status = 'running'),
           (select pg_catalog.count(*) from df.instances i where i.status = 'completed'),
           (select pg_catalog.count(*) from df.instances i where i.status = 'failed'),
           (select pg_catalog.count(distinct n.status_details ->> 'execution_id') from df.nodes n),
           (select pg_catalog.count(*) from df.nodes n where n.status <> 'pending')
             + (select pg_catalog.count(*) from @engine@.signals s)
$$;

------------------------------------------------------------------------------------------
-- explain
------------------------------------------------------------------------------------------

-- Tenants' text shown, not sent (the convention of pgdurable/sanitize.py, its Python twin):
-- newline, carriage return and tab become the two characters \n \r \t; the other C0
-- controls (ESC, so every CSI/OSC sequence loses its introducer), DEL, the C1 controls, the
-- separators U+2028/U+2029 and the bidi embeddings/overrides/isolates U+202A-U+202E and
-- U+2066-U+2069 become \u and four lower-case hex digits (JSON's escape: JSON text stays
-- valid JSON); everything else, the backslash too, is kept, so ordinary text is unchanged.
create function df._visible(p_text text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
    -- E'' literals: their meaning does not depend on the caller's standard_conforming_strings
    select case
        when p_text operator(pg_catalog.!~)
             e'[\\x01-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]'
            then p_text
        else (select pg_catalog.string_agg(
                  case when c.ch operator(pg_catalog.=) e'\n' then e'\\n'
                       when c.ch operator(pg_catalog.=) e'\r' then e'\\r'
                       when c.ch operator(pg_catalog.=) e'\t' then e'\\t'
                       when c.ch operator(pg_catalog.~)
                            e'[\\x01-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069]'
                           then e'\\u' operator(pg_catalog.||)
                                pg_catalog.lpad(pg_catalog.to_hex(pg_catalog.ascii(c.ch)), 4, '0')
                       else c.ch end, '' order by c.ord)
              from pg_catalog.regexp_split_to_table(p_text, '') with ordinality as c(ch, ord))
    end
$$;

-- Render a node map {id: {t, q, n, l, r, c, x, m}} as an indented tree, iteratively (an
-- explicit stack; plpgsql recursion 256 deep could exhaust the C stack). Unnamed THEN chains
-- are flattened into one line per element, every element after the first prefixed `→ `, so
-- there is exactly one → per THEN edge. m is the inferred status (NULL = no mark, dry run).
-- Every label and id is tenants' text, shown through df._visible: one line per node.
create function df._explain_render(p_nodes jsonb, p_root text) returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_ids    pg_catalog.text[] := array[p_root];
    v_ind    pg_catalog.int4[] := array[0];
    v_pre    pg_catalog.text[] := array[''];
    v_lines  pg_catalog.text[] := array[]::pg_catalog.text[];
    v_id     pg_catalog.text;
    v_indent pg_catalog.int4;
    v_prefix pg_catalog.text;
    v_node   pg_catalog.jsonb;
    v_cfg    pg_catalog.jsonb;
    v_label  pg_catalog.text;
    v_mark   pg_catalog.text;
    v_kids   pg_catalog.text[];
    v_roles  pg_catalog.text[];
    v_k      pg_catalog.int4;
    v_top    pg_catalog.int4;
begin
    while cardinality(v_ids) > 0 loop
        v_top := cardinality(v_ids);
        v_id := v_ids[v_top]; v_indent := v_ind[v_top]; v_prefix := v_pre[v_top];
        v_ids := v_ids[1:v_top - 1]; v_ind := v_ind[1:v_top - 1]; v_pre := v_pre[1:v_top - 1];
        if cardinality(v_lines) > 20000 then
            v_lines := v_lines || '…'::pg_catalog.text;
            exit;
        end if;
        v_node := p_nodes -> v_id;
        if v_node is null then
            v_lines := v_lines || (repeat(' ', v_indent) || v_prefix || '? missing node '
                                   || df._visible(coalesce(v_id, 'null')));
            continue;
        end if;
        if v_node ->> 't' = 'THEN' and v_node ->> 'n' is null then
            -- a sequence: left then right at this level (a role label gets its own line)
            if v_prefix not in ('', '→ ') then
                v_lines := v_lines || (repeat(' ', v_indent) || rtrim(v_prefix));
                v_indent := v_indent + 2;
                v_prefix := '';
            end if;
            v_ids := v_ids || array[v_node ->> 'r', v_node ->> 'l'];
            v_ind := v_ind || array[v_indent, v_indent];
            v_pre := v_pre || array['→ ', v_prefix];
            continue;
        end if;
        v_cfg := case when v_node ->> 't' in ('WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'BREAK', 'IF',
                                              'RETRY', 'FOREACH')
                      then df._try_jsonb(v_node ->> 'q') end;
        v_label := case v_node ->> 't'
            when 'SQL' then 'SQL: ' || regexp_replace(btrim(v_node ->> 'q'), '\s+', ' ', 'g')
            when 'SLEEP' then 'SLEEP ' || btrim(v_node ->> 'q') || 's'
            when 'WAIT_SCHEDULE' then 'WAIT ' || quote_literal(coalesce(v_cfg ->> 'cron_expr', '?'))
            when 'SIGNAL' then 'SIGNAL ' || quote_literal(coalesce(v_cfg ->> 'signal_name', '?'))
                               || coalesce(' (timeout ' || (v_cfg ->> 'timeout_seconds') || 's)', '')
            when 'HTTP' then 'HTTP ' || upper(coalesce(v_cfg ->> 'method', '?')) || ' ' || coalesce(v_cfg ->> 'url', '?')
            when 'HTTP_MULTIPART' then 'HTTP ' || upper(coalesce(v_cfg ->> 'method', '?')) || ' '
                                       || coalesce(v_cfg ->> 'url', '?') || ' (multipart)'
            when 'BREAK' then 'BREAK' || coalesce(' ' || (v_cfg ->> 'break_value'), '')
            when 'LOOP' then case when v_node ->> 'c' is null then 'LOOP (infinite)' else 'LOOP (while)' end
            when 'IF' then case when v_node ->> 'c' is null
                                then 'IF has rows: ' || coalesce(v_cfg ->> 'result_name', '?') else 'IF' end
            -- 'x' is JSON null (not SQL NULL) for a two-branch JOIN of a live instance
            when 'JOIN' then 'JOIN (' || (2 + jsonb_array_length(
                coalesce(nullif(v_node -> 'x', 'null'::pg_catalog.jsonb), '[]'::pg_catalog.jsonb))) || ')'
            when 'RACE' then 'RACE'
            when 'THEN' then 'THEN'
            -- a live one: the attempt it is on, and why the last one failed
            when 'RETRY' then 'RETRY (' || case
                when v_node ->> 'a' is not null
                    then 'attempt ' || (v_node ->> 'a') || '/' || coalesce(v_cfg ->> 'max_attempts', '?')
                         || coalesce(', next at ' || (v_node ->> 'u'), '')
                         || coalesce(', last error: ' || left(v_node ->> 'e', 200), '')
                else 'up to ' || coalesce(v_cfg ->> 'max_attempts', '?') || ' attempts, delay '
                     || coalesce(v_cfg ->> 'initial_delay_seconds', '?') || 's x'
                     || coalesce(v_cfg ->> 'backoff', '?') || ' up to '
                     || coalesce(v_cfg ->> 'max_delay_seconds', '?') || 's' end || ')'
            -- df.foreach: its rows query, and a live one's progress (rows done / rows)
            when 'FOREACH' then 'FOREACH ('
                || coalesce((v_node #>> '{p,progress}') || ' rows done, '
                            || (v_node #>> '{p,rows_running}') || ' running, ', '')
                || 'max_parallel ' || coalesce(v_cfg ->> 'max_parallel', '?') || '): '
                || left(regexp_replace(btrim(coalesce(v_cfg ->> 'rows', '?')), '\s+', ' ', 'g'), 200)
            else coalesce(v_node ->> 't', '?') end
            || coalesce(' |=> ' || quote_literal(v_node ->> 'n'), '')
            -- per-node timings of a live instance: run time, and time queued before a worker
            -- picked it up (status_details: queued_at, started_at, finished_at, duration_ms)
            || coalesce(' (' || (v_node ->> 'd') || ' ms'
                        || case when (v_node ->> 'w')::pg_catalog.numeric > 0
                                then ', queued ' || (v_node ->> 'w') || ' ms' else '' end
                        || ')', '');
        v_mark := case v_node ->> 'm'
            when 'completed' then '✓ ' when 'failed' then '✗ ' when 'running' then '⏳ '
            when 'pending' then '○ ' when 'skipped' then '⊘ ' else '' end;
        v_lines := v_lines || (repeat(' ', v_indent) || v_prefix || v_mark || df._visible(v_label));
        -- children in display order
        case v_node ->> 't'
            when 'IF' then
                v_kids := array[v_node ->> 'c', v_node ->> 'l', v_node ->> 'r'];
                v_roles := array['condition: ', 'then: ', 'else: '];
            when 'LOOP' then
                v_kids := array[v_node ->> 'l', v_node ->> 'c'];
                v_roles := array['body: ', 'while: '];
            when 'JOIN' then
                v_kids := array[v_node ->> 'l', v_node ->> 'r']
                          || coalesce(array(select jsonb_array_elements_text(
                                 coalesce(nullif(v_node -> 'x', 'null'::pg_catalog.jsonb), '[]'::pg_catalog.jsonb))), '{}');
                v_roles := array(select 'branch ' || g || ': ' from generate_series(1, cardinality(v_kids)) g);
            when 'RACE' then
                v_kids := array[v_node ->> 'l', v_node ->> 'r'];
                v_roles := array['branch 1: ', 'branch 2: '];
            when 'THEN' then
                v_kids := array[v_node ->> 'l', v_node ->> 'r'];
                v_roles := array['', '→ '];
            when 'RETRY' then
                v_kids := array[v_node ->> 'l'];
                v_roles := array['attempt: '];
            else
                v_kids := '{}';
                v_roles := '{}';
        end case;
        -- push in reverse so the first child is rendered first; absent children are dropped
        for v_k in reverse cardinality(v_kids) .. 1 loop
            continue when v_kids[v_k] is null;
            v_ids := v_ids || v_kids[v_k];
            v_ind := v_ind || (v_indent + 2);
            v_pre := v_pre || v_roles[v_k];
        end loop;
    end loop;
    return array_to_string(v_lines, e'\n');
end;
$$;

create function df.explain(input text) returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
declare
    v_inst  record;
    v_nodes pg_catalog.jsonb;
    v_text  pg_catalog.text := input;
    v_row   record;
    v_flat  pg_catalog.jsonb;
begin
    if input is null then
        return null;
    end if;
    if input ~ '^[0-9a-f]{8}$' then
        select i.id, i.status, i.root_node,
               df._node_result(i.id, i.root_node)::pg_catalog.text as output
        into v_inst
        from df.instances i where i.id = input;
        if not found then
            raise exception 'Instance not found or access denied: %', input using errcode = 'P0002';
        end if;
        select jsonb_object_agg(n.id, jsonb_build_object(
                   't', n.node_type, 'q', n.query, 'n', n.result_name, 'l', n.left_node,
                   'r', n.right_node, 'm', t.inferred_status,
                   'd', case when t.inferred_status in ('completed', 'failed')
                             then n.status_details ->> 'duration_ms' end,
                   'w', case when t.inferred_status in ('completed', 'failed', 'running')
                                  and n.status_details ? 'queued_at'
                             then round(1000 * extract(epoch from
                                  (n.status_details ->> 'started_at')::pg_catalog.timestamptz
                                  - (n.status_details ->> 'queued_at')::pg_catalog.timestamptz)) end,
                   'c', case when n.node_type in ('IF', 'LOOP') then df._try_jsonb(n.query) ->> 'condition_node' end,
                   'x', case when n.node_type = 'JOIN' then df._try_jsonb(n.query) -> 'extra_nodes' end,
                   -- a RETRY that began: its attempt, the last error, when it runs again
                   'a', case when n.node_type = 'RETRY' and t.inferred_status <> 'pending'
                             then n.status_details ->> 'attempt' end,
                   'e', case when n.node_type = 'RETRY' and t.inferred_status <> 'pending'
                             then n.status_details ->> 'last_error' end,
                   'u', case when n.node_type = 'RETRY' and t.inferred_status = 'running'
                             then n.status_details ->> 'next_attempt_at' end,
                   -- a FOREACH whose rows query ran: its progress (38_foreach.sql)
                   'p', case when n.node_type = 'FOREACH' and t.inferred_status <> 'pending'
                             then @engine@._foreach_progress_v1(n.instance_id, n.id) end))
        into v_nodes
        from df.nodes n join df._node_tree(input) t on t.node_id = n.id
        where n.instance_id = input;
        return format(e'Instance: %s\nStatus: %s\nOutput: %s\n\n', v_inst.id, v_inst.status,
                      df._visible(coalesce(v_inst.output, '(none)')))
               || df._explain_render(coalesce(v_nodes, '{}'), v_inst.root_node);
    end if;

    -- dry run: DSL text is evaluated (as the caller, like typing SELECT <input>); graph JSON
    -- and plain SQL go straight to the validator (plain SQL auto-wraps into one SQL node)
    if input !~ '^\s*\{'
       and (input ~* '\mdf\s*\.\s*(sql|seq|as|join|join3|race|if|if_rows|loop|break|sleep|wait_for_schedule|wait_for_signal|http|http_multipart|retry|foreach)\s*\('
            or input ~ '~>|\|=>|\?>|!>|^\s*@>') then
        -- through a cursor: PostgreSQL refuses to open a multi-statement string as one, so
        -- `x); <another statement>; select (y` cannot smuggle extra statements into a dry run
        -- the DSL text may use the operators, which a non-superuser install puts in
        -- @opschema@ (scoped to this call: the function's SET clause restores it)
        perform pg_catalog.set_config('search_path', 'pg_catalog, @opschema@, pg_temp', true);
        for v_row in execute 'select (' || regexp_replace(input, ';\s*$', '') || e'\n)::text as t' loop
            v_text := v_row.t;
            exit;
        end loop;
        if v_text is null then
            return 'Invalid durable function graph: root: the expression returned NULL';
        end if;
    end if;
    begin
        v_flat := df._graph_flatten(df._graph_value(v_text));
    exception when sqlstate '22023' or sqlstate '54000' then
        return 'Invalid durable function graph: root: ' || df._visible(sqlerrm);
    end;
    select jsonb_object_agg(n.id, jsonb_build_object(
               't', n.node_type, 'q', n.query, 'n', n.result_name, 'l', n.left_node, 'r', n.right_node,
               'c', case when n.node_type in ('IF', 'LOOP') then df._try_jsonb(n.query) ->> 'condition_node' end,
               'x', case when n.node_type = 'JOIN' then df._try_jsonb(n.query) -> 'extra_nodes' end))
    into v_nodes
    from jsonb_to_recordset(v_flat)
         as n(id pg_catalog.text, node_type pg_catalog.text, query pg_catalog.text,
              result_name pg_catalog.text, left_node pg_catalog.text, right_node pg_catalog.text);
    return format(e'Dry run (not started): %s nodes\n\n', jsonb_array_length(v_flat))
           || df._explain_render(v_nodes, v_flat -> 0 ->> 'id');
end;
$$;

------------------------------------------------------------------------------------------
-- vars (per owner, RLS-scoped; frozen into an instance at df.start)
------------------------------------------------------------------------------------------

create function df.setvar(name text, value text) returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
begin
    if @engine@.in_workflow() then
        raise exception 'df.setvar cannot be called inside a workflow' using errcode = '0A000';
    end if;
    if coalesce(name, '') = '' then
        raise exception 'df.setvar: name must be non-empty' using errcode = '22023';
    end if;
    -- tenants hold only SELECT on df.vars: the write goes through the engine (50_engine.sql)
    return @engine@._vars_v1('set', setvar.name, setvar.value);
end;
$$;

create function df.getvar(name text) returns text
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$
    select v.value from df.vars v
    where v.name = $1 and v.owner = quote_ident(current_user)::pg_catalog.regrole
$$;

create function df.unsetvar(name text) returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
begin
    if @engine@.in_workflow() then
        raise exception 'df.unsetvar cannot be called inside a workflow' using errcode = '0A000';
    end if;
    return @engine@._vars_v1('unset', unsetvar.name, null);
end;
$$;

create function df.clearvars() returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
begin
    if @engine@.in_workflow() then
        raise exception 'df.clearvars cannot be called inside a workflow' using errcode = '0A000';
    end if;
    return @engine@._vars_v1('clear', null, null);
end;
$$;

------------------------------------------------------------------------------------------
-- misc
------------------------------------------------------------------------------------------

create function df.version() returns text
language sql immutable strict
set search_path = pg_catalog, pg_temp
as $$ select '@version@ (df API 0.2.6)'::pg_catalog.text $$;

-- The original's manual trigger; pgdurable's service picks work up by itself.
create function df.run(instance_id text default null) returns text
language sql volatile
set search_path = pg_catalog, pg_temp
as $$ select 'df.run has nothing to do: pgdurable serve picks work up by itself'::pg_catalog.text $$;

-- The database holding df and the engine (pg_durable.database in the original): this one.
create function df.target_database() returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$ select current_database()::pg_catalog.text $$;

create function df.duroxide_schema() returns text
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '@engine@'::pg_catalog.text $$;

-- The live service processes; a view (owner's rights) so users need no engine privilege.
create view df.workers as
    select w.host, w.pid, w.kind, w.version, w.started_at, w.last_seen_at, w.in_flight
    from @engine@.workers w;

------------------------------------------------------------------------------------------
-- grants
------------------------------------------------------------------------------------------

-- The engine helpers the df functions call as the caller: df.grant_usage gives a role EXECUTE
-- on them, df.revoke_usage takes it back (one list for both).
create function df._usage_helpers() returns text[]
language sql immutable
set search_path = pg_catalog, pg_temp
as $$ select array[
    '@engine@.setting(text,text)', '@engine@.clock()', '@engine@.in_workflow()',
    '@engine@._schema_ready_v1()', '@engine@._enqueue_v1(varchar,jsonb)',
    '@engine@._signal_v1(varchar,text,jsonb)', '@engine@._cancel_v1(varchar,text)',
    '@engine@._new_start_v1(name,text,text,text)',
    '@engine@._start_v1(regrole,text,text,text,boolean)',
    '@engine@._vars_v1(text,text,text)', '@engine@._restart_v1(varchar)',
    '@engine@._run_history_v1(varchar)',
    '@engine@._foreach_progress_v1(varchar,varchar)']::pg_catalog.text[] $$;

-- Additive, SECURITY INVOKER (the caller must hold what it hands out). Besides the
-- df grants, the role gets USAGE on the engine schema and EXECUTE on the engine helpers the
-- df functions call (they are SECURITY DEFINER and check ownership themselves). Tenants get
-- SELECT on df.vars, not INSERT/UPDATE/DELETE: df.setvar/unsetvar/clearvars write it, and
-- table-level DML would let any tenant LOCK the shared table and stall every df.start.
--
-- Then the role's step runner and next-step runner (50_engine.sql): SECURITY DEFINER functions
-- owned by the role in @engine@_exec; both are made again when either is missing or not the
-- engine's current one (after an upgrade, re-running df.grant_usage gives a role the
-- next-step runner). Only a role that can act as the tenant can make a function it owns, so
-- this part needs an administrator (a superuser, or a managed cloud's admin role with
-- CREATEROLE); a delegated admin without that gets an error saying what to run. The role is
-- given CREATE on @engine@_exec only for the moment it takes to make the runner.
create function df.grant_usage(p_role text, include_http boolean default false,
                               with_grant boolean default false)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_opt  text := case when with_grant then ' with grant option' else '' end;
    v_fn   text;
    v_oid  pg_catalog.oid;
    v_me   pg_catalog.text := current_user;
    v_ddl  pg_catalog.text;
    v_next_ddl pg_catalog.text;
    -- the next-step runner's argument types (50_engine.sql, _runner_next_ddl_v1)
    v_next_args pg_catalog.text := 'pg_catalog.text[], pg_catalog.text[], pg_catalog.text, '
        'pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.int8, '
        'pg_catalog.text[]';
begin
    select r.oid into v_oid from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) p_role;
    if p_role is null or v_oid is null then
        raise exception 'role "%" does not exist', p_role using errcode = '42704';
    end if;
    if p_role operator(pg_catalog.=) any ('{pgdurable_owner,pgdurable_service,pgdurable_step}'::pg_catalog.text[]) then
        raise exception 'role "%" is one of pgdurable''s own roles and cannot submit workflows', p_role
            using errcode = '42501';
    end if;
    execute pg_catalog.format('grant usage on schema df to %I%s', p_role, v_opt);
    execute pg_catalog.format('grant select on df.instances, df.nodes, df.workers, df.vars to %I%s', p_role, v_opt);
    execute pg_catalog.format('grant update (status, updated_at) on df.instances to %I%s', p_role, v_opt);
    execute pg_catalog.format('grant insert (id, label, root_node, submitted_by, database, idempotency_key) '
                   'on df.instances to %I%s', p_role, v_opt);
    execute pg_catalog.format('grant insert (id, instance_id, node_type, query, result_name, left_node, right_node, '
                   'submitted_by, database) on df.nodes to %I%s', p_role, v_opt);
    execute pg_catalog.format('grant usage on schema @engine@ to %I%s', p_role, v_opt);
    foreach v_fn in array df._usage_helpers() loop
        if pg_catalog.to_regprocedure(v_fn) is not null then
            execute pg_catalog.format('grant execute on function %s to %I%s',
                                      pg_catalog.to_regprocedure(v_fn), p_role, v_opt);
        end if;
    end loop;
    if include_http then
        -- defined by 10_dsl.sql
        foreach v_fn in array array['df.http(text,text,text,jsonb,integer)',
                                    'df.http_multipart(text,text,jsonb,jsonb,integer)'] loop
            if pg_catalog.to_regprocedure(v_fn) is not null then
                execute pg_catalog.format('grant execute on function %s to %I%s',
                                          pg_catalog.to_regprocedure(v_fn), p_role, v_opt);
            end if;
        end loop;
    end if;
    if with_grant then
        execute pg_catalog.format('grant execute on function df.grant_usage(text,boolean,boolean), '
                       'df.revoke_usage(text), df.metrics() to %I with grant option', p_role);
    end if;
    -- the runner, made (or remade after an upgrade) as the role itself; none for a superuser:
    -- its steps would run as one (and are refused unless enable_superuser_instances is on)
    if (select r.rolsuper from pg_catalog.pg_roles r where r.oid operator(pg_catalog.=) v_oid) then
        raise warning 'df.grant_usage(%): "%" is a superuser; no step runner is made for it, so its SQL steps cannot run',
            pg_catalog.quote_literal(p_role), p_role
            using hint = 'submit workflows as an ordinary role';
        return;
    end if;
    if not (@engine@._runner_ok_v1(v_oid) and @engine@._runner_next_ok_v1(v_oid)) then
        if not pg_catalog.pg_has_role(v_me, v_oid, 'USAGE') then
            begin
                -- an admin with CREATEROLE (PostgreSQL 15 and older) or ADMIN OPTION on the role
                execute pg_catalog.format('grant %I to %I', p_role, v_me);
            exception when insufficient_privilege or invalid_grant_operation then
                -- a delegated admin (with_grant) hands out the grants; the runner needs
                -- someone who can act as the role: say so, loudly, and what to run
                raise warning 'df.grant_usage(%): granted, but the step runner of "%" was not made: it must be created as that role, and "%" cannot act as it; the role''s SQL steps fail until it exists',
                    pg_catalog.quote_literal(p_role), p_role, v_me
                    using hint = pg_catalog.format('run select df.grant_usage(%L) as a superuser or as the administrator that created the role (CREATEROLE), or first: GRANT %I TO %I',
                                                   p_role, p_role, v_me);
                return;
            end;
        end if;
        execute pg_catalog.format('drop function if exists @engine@_exec.%I(pg_catalog.text, pg_catalog.text, pg_catalog.int8)',
                                  'step_' || v_oid::pg_catalog.text);
        execute pg_catalog.format('drop function if exists @engine@_exec.%I(pg_catalog.text)',
                                  'step_' || v_oid::pg_catalog.text);
        execute pg_catalog.format('drop function if exists @engine@_exec.%I(%s)',
                                  'next_' || v_oid::pg_catalog.text, v_next_args);
        execute pg_catalog.format('grant create on schema @engine@_exec to %I', p_role);
        v_ddl := @engine@._runner_ddl_v1(v_oid::pg_catalog.regrole, '@engine@_exec');
        v_next_ddl := @engine@._runner_next_ddl_v1(v_oid::pg_catalog.regrole, '@engine@_exec');
        execute pg_catalog.format('set local role %I', p_role);
        execute v_ddl;
        execute v_next_ddl;
        reset role;
        -- as the administrator, which can act as the role (the function's owner)
        execute pg_catalog.format('revoke all on function @engine@_exec.%I(pg_catalog.text, pg_catalog.text, pg_catalog.int8) from public',
                                  'step_' || v_oid::pg_catalog.text);
        execute pg_catalog.format('grant execute on function @engine@_exec.%I(pg_catalog.text, pg_catalog.text, pg_catalog.int8) to pgdurable_step',
                                  'step_' || v_oid::pg_catalog.text);
        execute pg_catalog.format('revoke all on function @engine@_exec.%I(%s) from public',
                                  'next_' || v_oid::pg_catalog.text, v_next_args);
        execute pg_catalog.format('grant execute on function @engine@_exec.%I(%s) to pgdurable_step',
                                  'next_' || v_oid::pg_catalog.text, v_next_args);
        execute pg_catalog.format('revoke create on schema @engine@_exec from %I', p_role);
        if not (@engine@._runner_ok_v1(v_oid) and @engine@._runner_next_ok_v1(v_oid)) then
            raise exception 'df.grant_usage(%): the step runner was made but does not verify', pg_catalog.quote_literal(p_role)
                using errcode = 'XX000';
        end if;
    end if;
    return;
end;
$$;

-- The mirror of df.grant_usage; CASCADE also removes what the role handed on. It revokes what
-- the caller may revoke: REVOKE fails on an object the caller holds no privilege on at all
-- (a delegated admin given with_grant but not include_http has none on df.http), so each
-- object is revoked only where the caller holds a grant option on it. Then, when the role no
-- longer has USAGE on df (another grantor's grant may remain), its runner is dropped; that
-- needs the owner of the runners' schema (a delegated admin is not: a WARNING says who must).
-- Its next-step runner goes with it.
create function df.revoke_usage(p_role text) returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_fn     text;
    v_tab    text;
    v_oid    pg_catalog.oid;
    v_runner pg_catalog.text;
begin
    select r.oid into v_oid from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) p_role;
    if p_role is null or v_oid is null then
        raise exception 'role "%" does not exist', p_role using errcode = '42704';
    end if;
    -- REVOKE ALL on a table also revokes the column privileges
    foreach v_tab in array array['df.instances', 'df.nodes', 'df.vars', 'df.workers'] loop
        if pg_catalog.to_regclass(v_tab) is not null
           and (pg_catalog.has_any_column_privilege(v_tab,
                    'SELECT WITH GRANT OPTION, INSERT WITH GRANT OPTION, UPDATE WITH GRANT OPTION, REFERENCES WITH GRANT OPTION')
                or pg_catalog.has_table_privilege(v_tab,
                    'DELETE WITH GRANT OPTION, TRUNCATE WITH GRANT OPTION, TRIGGER WITH GRANT OPTION')) then
            execute pg_catalog.format('revoke all on %s from %I cascade', v_tab, p_role);
        end if;
    end loop;
    foreach v_fn in array df._usage_helpers() || array[
        'df.grant_usage(text,boolean,boolean)',
        'df.revoke_usage(text)', 'df.metrics()', 'df.http(text,text,text,jsonb,integer)',
        'df.http_multipart(text,text,jsonb,jsonb,integer)'] loop
        if pg_catalog.to_regprocedure(v_fn) is not null
           and pg_catalog.has_function_privilege(pg_catalog.to_regprocedure(v_fn),
                                                 'EXECUTE WITH GRANT OPTION') then
            execute pg_catalog.format('revoke all on function %s from %I cascade',
                                      pg_catalog.to_regprocedure(v_fn), p_role);
        end if;
    end loop;
    foreach v_tab in array array['@engine@', 'df'] loop
        if pg_catalog.has_schema_privilege(v_tab, 'USAGE WITH GRANT OPTION, CREATE WITH GRANT OPTION') then
            execute pg_catalog.format('revoke all on schema %I from %I cascade', v_tab, p_role);
        end if;
    end loop;
    v_runner := pg_catalog.format('@engine@_exec.%I(pg_catalog.text, pg_catalog.text, pg_catalog.int8)',
                                  'step_' || v_oid::pg_catalog.text);
    -- and its next-step runner (50_engine.sql, _runner_next_ddl_v1), dropped with it
    v_runner := v_runner operator(pg_catalog.||) ', ' operator(pg_catalog.||) pg_catalog.format(
        '@engine@_exec.%I(pg_catalog.text[], pg_catalog.text[], pg_catalog.text, pg_catalog.text, '
        'pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.int8, pg_catalog.text[])',
        'next_' || v_oid::pg_catalog.text);
    if not pg_catalog.has_schema_privilege(v_oid, 'df', 'USAGE') then
        begin
            execute 'drop function if exists ' || v_runner;
        exception when insufficient_privilege then
            raise warning 'df.revoke_usage(%): revoked, but the step runner of "%" stays: "%" may not drop it',
                pg_catalog.quote_literal(p_role), p_role, current_user
                using hint = pg_catalog.format('run select df.revoke_usage(%L) as the administrator that installed pgdurable, or: DROP FUNCTION %s',
                                               p_role, v_runner);
        end;
    end if;
    return;
end;
$$;
