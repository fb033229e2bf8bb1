-- pgdurable schema, part 30: control — df.start, df.signal, df.cancel, df.status, df.result,
-- df.error, df.await_instance (+ deprecated df.wait_for_completion), the graph validator and
-- flattener df.start uses (shared with df.explain), and the engine helpers they call.
--
--   df._graph_flatten(jsonb)   validate a graph value, return its node rows in pre-order
--   df._graph_value(text)      auto-wrap a df.start/df.explain argument into a graph jsonb
--   df.start                   docs/api.md validation order, then instances + nodes + enqueue
--   @engine@._invoker()        the role that called into a SECURITY DEFINER helper
--   @engine@._schema_ready_v1  readiness (docs/decisions.md D3)
--   @engine@._enqueue_v1       validate the stored graph, then runs row + the 'start' task (ARCH §2)
--   @engine@._new_start_v1     transaction_mode 'new': df.start through a dblink session
--   @engine@._dblink_v1, _launch_connect_v1, _new_mode_check_v1   its dblink and launch session
--   @engine@._signal_v1 / _cancel_v1   transactional signal / cancel (docs/decisions.md D16, D17)
--
-- SQLSTATEs: standard codes where one fits — 22023 invalid_parameter_value (bad arguments,
-- bad graphs), 54000 program_limit_exceeded (graph limits), 3D000 (unknown database),
-- 42501 insufficient_privilege, P0002 no_data_found (unknown/invisible instance),
-- 55000 object_not_in_prerequisite_state (not ready, terminal instance, dblink missing),
-- 0A000 feature_not_supported (called inside a workflow), 55P03 lock_not_available (no
-- launch slot), 57014 query_canceled (await timeout, as statement_timeout does).
--
-- Name resolution: every function here pins `search_path = pg_catalog, pg_temp`. PostgreSQL
-- searches the session's temporary schema FIRST for relations and types unless pg_temp is
-- listed, so `search_path = pg_catalog` alone let a caller's temp table `pg_roles` or temp
-- DOMAIN `regrole`/`jsonb`/`text` (whose CHECK calls the caller's function) stand in for
-- the real one, inside a SECURITY DEFINER helper too. With pg_temp listed last, pg_catalog
-- wins for every name it has, and the helpers name everything else schema-qualified: every
-- relation (df., @engine@., pg_catalog.), every type in a cast or declaration
-- (pg_catalog.jsonb, pg_catalog.regrole, ...) and every function (pg_catalog.now(), ...).
-- Operators stay unqualified (OPERATOR(pg_catalog.=) everywhere would be unreadable): they
-- are never looked up in pg_temp, whatever search_path says, and pg_catalog is the only other
-- schema on the path, so `=` or `->>` can only resolve to pg_catalog's operators (the same
-- holds for unqualified function calls in the SECURITY INVOKER df functions).
-- tests/sql/test_definer_hygiene.py checks all of this on the installed catalog.
--
-- Identity inside SECURITY DEFINER helpers: current_user there is the schema owner, so the
-- helpers recover the calling role from the `role` setting (what SET ROLE chose; a session
-- can only set it to roles it is a member of) or else session_user, and check ownership of
-- the instance against it. The df.* wrappers check visibility under RLS first; the helpers
-- re-check because any role given df.grant_usage may call them directly.

------------------------------------------------------------------------------------------
-- graph values
------------------------------------------------------------------------------------------

-- Parse text as jsonb, NULL when it is not JSON (PG15 has no pg_input_is_valid).
create function df._try_jsonb(p_text text) returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    return p_text::pg_catalog.jsonb;
exception when others then
    return null;
end;
$$;

-- Auto-wrap (docs/api.md): a JSON object with a node_type is a graph, a JSON object with a
-- non-text/unknown node_type raises (in df._graph_flatten), anything else is one SQL node.
create function df._graph_value(p_input text) returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_json pg_catalog.jsonb;
begin
    if p_input ~ '^\s*\{' then
        v_json := df._try_jsonb(p_input);
        if jsonb_typeof(v_json) = 'object' and v_json ? 'node_type' then
            return v_json;
        end if;
        -- Text that starts like a graph value but does not parse (the DSL embeds its own
        -- output unparsed; a NUL escape; absurd nesting) must not silently become one SQL
        -- step with the rest of the graph gone.
        if v_json is null and p_input ~ '^\s*\{\s*"node_type"\s*:' then
            raise exception using errcode = '22023',
                message = 'Invalid durable function graph: root: the value starts like a '
                          'graph but is not valid JSON (or nests deeper than PostgreSQL parses)',
                hint = 'Build graphs with the df.* functions and operators; check any '
                       'hand-written JSON.';
        end if;
    end if;
    return jsonb_build_object('node_type', 'SQL', 'query', p_input);
end;
$$;

-- What is wrong with a RETRY node's stored config (its query), NULL when nothing: the text
-- df.retry writes (10_dsl.sql, df._retry_config), or by hand the same four numbers, checked
-- by the same rules. Used by df.start (df._graph_flatten) and @engine@._enqueue_v1, so the
-- worker never loads a RETRY it cannot time.
create function df._retry_problem(p_query text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_cfg pg_catalog.jsonb := df._try_jsonb(p_query);
begin
    if jsonb_typeof(v_cfg) is distinct from 'object'
       or jsonb_typeof(v_cfg -> 'max_attempts') is distinct from 'number'
       or jsonb_typeof(v_cfg -> 'initial_delay_seconds') is distinct from 'number'
       or jsonb_typeof(v_cfg -> 'backoff') is distinct from 'number'
       or jsonb_typeof(v_cfg -> 'max_delay_seconds') is distinct from 'number' then
        return 'RETRY config needs the numbers max_attempts, initial_delay_seconds, backoff and '
               'max_delay_seconds (build it with df.retry)';
    end if;
    if (v_cfg ->> 'max_attempts') !~ '^[0-9]{1,10}$'
       or (v_cfg ->> 'max_attempts')::pg_catalog.int8 > 2147483647 then
        return pg_catalog.format('df.retry: max_attempts must be a whole number from 1 to '
                                 '2147483647, got %s', v_cfg ->> 'max_attempts');
    end if;
    perform df._retry_config((v_cfg ->> 'max_attempts')::pg_catalog.int4,
                             (v_cfg ->> 'initial_delay_seconds')::pg_catalog.float8,
                             (v_cfg ->> 'backoff')::pg_catalog.float8,
                             (v_cfg ->> 'max_delay_seconds')::pg_catalog.float8);
    return null;
exception
    when sqlstate '22023' or numeric_value_out_of_range or invalid_text_representation then
        return sqlerrm;
end;
$$;

-- Validate a whole graph value and flatten it (ARCHITECTURE §2). Returns a jsonb array of
-- {id, node_type, query, result_name, left_node, right_node} in pre-order with child order
-- condition_node, left_node, right_node, extra_nodes. Raises on the first invalid node with
-- its path (root.left_node.…). Node ids are fresh random 8-hex values, handed out in sorted
-- order along the pre-order (a convenience for readers, not a contract).
--
-- The walk is one recursive CTE; a child is only descended into when it is a JSON object,
-- and the walk stops one level past the depth limit (so a hostile value cannot make it run
-- away) and one row past the node limit (LIMIT stops a recursive CTE early).
--
-- Nesting depth: the root is at depth 0, each child one deeper than its parent; a graph may
-- nest 256 deep (its deepest node at depth 256, so 257 node levels), one nested deeper is
-- refused. @engine@._enqueue_v1 counts the same way.
create function df._graph_flatten(p_graph jsonb) returns jsonb
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    c_max_depth constant pg_catalog.int4 := 256;
    c_max_nodes constant pg_catalog.int4 := 10000;
    v_walk   pg_catalog.jsonb;
    v_count  pg_catalog.int4;
    v_ids    pg_catalog.text[];
    v_node   pg_catalog.jsonb;
    v_obj    pg_catalog.jsonb;
    v_type   pg_catalog.text;
    v_where  pg_catalog.text;
    v_query  pg_catalog.jsonb;
    v_cfg    pg_catalog.jsonb;
    v_leaf   pg_catalog.bool;
    v_result pg_catalog.jsonb;
begin
    -- Cheap guard first: a value nested far past the limit is rejected in one C-level
    -- jsonpath scan, before the walk below (which copies subtrees per level) ever sees it.
    -- 600 JSON levels > the deepest legal graph (257 node levels, ≤ 2 JSON levels each).
    if jsonb_path_exists(p_graph, 'lax $.**{600}') then
        raise exception 'durable function graph exceeds the maximum nesting depth of % (at root)',
            c_max_depth using errcode = '54000';
    end if;
    if p_graph is null or jsonb_typeof(p_graph) <> 'object' then
        raise exception 'a durable function graph must be a JSON object'
            using errcode = '22023';
    end if;
    with recursive walk(obj, path, names, depth) as (
        select p_graph, array[]::pg_catalog.int4[], 'root'::pg_catalog.text, 0
        union all
        select c.obj, w.path || c.ord, w.names || '.' || c.name, w.depth + 1
        from walk w
        cross join lateral (
            select w.obj -> 'condition_node' as obj, 0 as ord, 'condition_node' as name
            where jsonb_typeof(w.obj -> 'condition_node') = 'object'
            union all
            select w.obj -> 'left_node', 1, 'left_node'
            where jsonb_typeof(w.obj -> 'left_node') = 'object'
            union all
            select w.obj -> 'right_node', 2, 'right_node'
            where jsonb_typeof(w.obj -> 'right_node') = 'object'
            union all
            select e.value, 2 + e.ord::pg_catalog.int4, 'extra_nodes[' || (e.ord - 1) || ']'
            from jsonb_array_elements(case when jsonb_typeof(w.obj -> 'extra_nodes') = 'array'
                                           then w.obj -> 'extra_nodes' end)
                 with ordinality e(value, ord)
            where jsonb_typeof(e.value) = 'object'
        ) c
        where w.depth <= c_max_depth
    ), limited as (
        select * from walk limit c_max_nodes + 1
    )
    select jsonb_agg(jsonb_build_object('p', path, 'n', names, 'd', depth,
                                        'o', obj - 'condition_node' - 'left_node' - 'right_node'
                                                 - 'extra_nodes',
                                        'c', jsonb_build_object(
                                            'condition_node', obj -> 'condition_node',
                                            'left_node', obj -> 'left_node',
                                            'right_node', obj -> 'right_node',
                                            'extra_nodes', obj -> 'extra_nodes'))
                     order by path),
           count(*)
    into v_walk, v_count
    from limited;

    if v_count > c_max_nodes then
        raise exception 'durable function graph has more than % nodes', c_max_nodes
            using errcode = '54000';
    end if;

    -- validate every node (pre-order, so the error names the first bad node from the root)
    for v_node in select value from jsonb_array_elements(v_walk) loop
        v_obj := v_node -> 'o';
        v_where := v_node ->> 'n';
        if (v_node ->> 'd')::pg_catalog.int4 > c_max_depth then
            raise exception 'durable function graph exceeds the maximum nesting depth of % (at %)',
                c_max_depth, v_where using errcode = '54000';
        end if;
        if jsonb_typeof(v_obj -> 'node_type') is distinct from 'string' then
            raise exception 'Unknown node_type ''%'' (at %)', coalesce(v_obj ->> 'node_type', 'null'),
                v_where using errcode = '22023';
        end if;
        v_type := v_obj ->> 'node_type';
        if v_type not in ('SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'BREAK', 'SLEEP',
                          'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'RETRY',
                          'FOREACH') then
            raise exception 'Unknown node_type ''%'' (at %)', v_type, v_where using errcode = '22023';
        end if;
        if v_obj -> 'result_name' is not null and jsonb_typeof(v_obj -> 'result_name') <> 'null'
           and (jsonb_typeof(v_obj -> 'result_name') <> 'string'
                or (v_obj ->> 'result_name') !~ '^[A-Za-z_][A-Za-z0-9_]*$') then
            raise exception 'result_name % is not a valid identifier (at %)',
                (v_obj -> 'result_name')::pg_catalog.text, v_where using errcode = '22023';
        end if;
        -- a child key present but not an object is a malformed graph, never silently dropped
        if v_node #> '{c,condition_node}' is not null
           and jsonb_typeof(v_node #> '{c,condition_node}') not in ('object', 'null') then
            raise exception 'condition_node in % must be a first-class Durofut field holding a node object (at %)',
                v_type, v_where using errcode = '22023';
        end if;
        if jsonb_typeof(v_node #> '{c,left_node}') not in ('object', 'null')
           or jsonb_typeof(v_node #> '{c,right_node}') not in ('object', 'null') then
            raise exception 'left_node and right_node must be Durofut JSON objects (at %)', v_where
                using errcode = '22023';
        end if;
        if v_node #> '{c,extra_nodes}' is not null and jsonb_typeof(v_node #> '{c,extra_nodes}') <> 'null'
           and (jsonb_typeof(v_node #> '{c,extra_nodes}') <> 'array'
                or exists (select 1 from jsonb_array_elements(v_node #> '{c,extra_nodes}') e
                           where jsonb_typeof(e) <> 'object')) then
            raise exception 'extra_nodes entries must be Durofut JSON objects (at %)', v_where
                using errcode = '22023';
        end if;

        v_query := v_obj -> 'query';
        if v_query is not null and jsonb_typeof(v_query) not in ('string', 'null') then
            raise exception 'query of a % node must be a JSON string (at %)', v_type, v_where
                using errcode = '22023';
        end if;
        if jsonb_typeof(v_query) = 'null' then
            v_query := null;
        end if;
        v_leaf := v_type in ('SQL', 'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART',
                             'FOREACH');
        if v_leaf then
            if v_query is null or btrim(v_query #>> '{}') = '' then
                raise exception '% node needs a non-empty query (at %)', v_type, v_where
                    using errcode = '22023';
            end if;
            if jsonb_typeof(v_node #> '{c,left_node}') = 'object'
               or jsonb_typeof(v_node #> '{c,right_node}') = 'object'
               or jsonb_typeof(v_node #> '{c,condition_node}') = 'object'
               or jsonb_typeof(v_node #> '{c,extra_nodes}') = 'array' then
                raise exception '% node cannot have child nodes (at %)', v_type, v_where
                    using errcode = '22023';
            end if;
            if v_type = 'SLEEP' and (v_query #>> '{}') !~ '^\s*[0-9]+\s*$' then
                raise exception 'SLEEP query must be a non-negative number of seconds, got % (at %)',
                    v_query::pg_catalog.text, v_where using errcode = '22023';
            end if;
            if v_type in ('BREAK', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART') then
                v_cfg := df._try_jsonb(v_query #>> '{}');
                if jsonb_typeof(v_cfg) is distinct from 'object' then
                    raise exception 'query of a % node must be valid JSON config (at %)', v_type, v_where
                        using errcode = '22023';
                end if;
                -- the worker parses configs in Python (1,024 levels at most): refuse here what
                -- it could never read (no builder writes more than 3 levels)
                if jsonb_path_exists(v_cfg, 'lax $.**{64}') then
                    raise exception 'the config of a % node nests deeper than 64 levels (at %)',
                        v_type, v_where using errcode = '54000';
                end if;
                if v_type = 'WAIT_SCHEDULE' and jsonb_typeof(v_cfg -> 'cron_expr') is distinct from 'string' then
                    raise exception 'WAIT_SCHEDULE config needs a cron_expr string (at %)', v_where
                        using errcode = '22023';
                end if;
                if v_type = 'SIGNAL' and (jsonb_typeof(v_cfg -> 'signal_name') is distinct from 'string'
                                          or v_cfg ->> 'signal_name' = '') then
                    raise exception 'SIGNAL config needs a non-empty signal_name (at %)', v_where
                        using errcode = '22023';
                end if;
                if v_type in ('HTTP', 'HTTP_MULTIPART')
                   and (jsonb_typeof(v_cfg -> 'url') is distinct from 'string'
                        or jsonb_typeof(v_cfg -> 'method') is distinct from 'string') then
                    raise exception '% config needs url and method strings (at %)', v_type, v_where
                        using errcode = '22023';
                end if;
            end if;
            -- Hand-written configs get the same checks as the DSL builders (docs/reliability.md: df.start
            -- validates cron and HTTP arguments too): re-build the leaf with its builder.
            begin
                case v_type
                    when 'SLEEP' then
                        perform df.sleep((v_query #>> '{}')::pg_catalog.int8);
                    when 'WAIT_SCHEDULE' then
                        perform df.wait_for_schedule(v_cfg ->> 'cron_expr');
                    when 'SIGNAL' then
                        perform df.wait_for_signal(v_cfg ->> 'signal_name',
                                                   (v_cfg ->> 'timeout_seconds')::pg_catalog.int4);
                    -- the builders' checks without df.http's EXECUTE privilege: a role without
                    -- it may start the graph and fails at run time (docs/http.md gate 0)
                    when 'HTTP' then
                        perform df._check_http('df.http', v_cfg ->> 'url', v_cfg ->> 'method',
                                               array['GET', 'POST', 'PUT', 'DELETE', 'PATCH'],
                                               nullif(v_cfg -> 'headers', 'null'::pg_catalog.jsonb),
                                               coalesce((v_cfg ->> 'timeout_seconds')::pg_catalog.int4, 30));
                    when 'HTTP_MULTIPART' then
                        perform df._check_http('df.http_multipart', v_cfg ->> 'url',
                                               v_cfg ->> 'method', array['POST', 'PUT', 'PATCH'],
                                               nullif(v_cfg -> 'headers', 'null'::pg_catalog.jsonb),
                                               coalesce((v_cfg ->> 'timeout_seconds')::pg_catalog.int4, 30));
                        if jsonb_typeof(v_cfg -> 'parts') is distinct from 'array'
                           or jsonb_array_length(v_cfg -> 'parts') = 0 then
                            raise exception 'df.http_multipart: parts must be a non-empty JSON array'
                                using errcode = '22023';
                        end if;
                    -- df.foreach's checks (38_foreach.sql): rows, body (a whole graph of its
                    -- own, validated as df.start would) and max_parallel
                    when 'FOREACH' then
                        if df._foreach_problem(v_query #>> '{}') is not null then
                            raise exception '%', df._foreach_problem(v_query #>> '{}')
                                using errcode = '22023';
                        end if;
                    else
                        null;
                end case;
            exception
                when sqlstate '22023' then
                    raise exception '% (at %)', sqlerrm, v_where using errcode = '22023';
                when invalid_text_representation or numeric_value_out_of_range then
                    raise exception 'invalid number in the % node''s config: % (at %)',
                        v_type, sqlerrm, v_where using errcode = '22023';
            end;
        else
            if jsonb_typeof(v_node #> '{c,left_node}') is distinct from 'object' then
                raise exception '% node needs a left_node (at %)', v_type, v_where using errcode = '22023';
            end if;
            if v_type in ('LOOP', 'RETRY') then
                if jsonb_typeof(v_node #> '{c,right_node}') = 'object' then
                    raise exception '% node cannot have a right_node (at %)', v_type, v_where
                        using errcode = '22023';
                end if;
            elsif jsonb_typeof(v_node #> '{c,right_node}') is distinct from 'object' then
                raise exception '% node needs a right_node (at %)', v_type, v_where using errcode = '22023';
            end if;
            if v_type <> 'JOIN' and jsonb_typeof(v_node #> '{c,extra_nodes}') = 'array' then
                raise exception 'extra_nodes is only allowed on JOIN nodes (at %)', v_where
                    using errcode = '22023';
            end if;
            -- the worker runs JOINs of two or three branches (df.join, df.join3); a longer list
            -- would be stored and then fail every load of the instance
            if jsonb_array_length(case when jsonb_typeof(v_node #> '{c,extra_nodes}') = 'array'
                                       then v_node #> '{c,extra_nodes}' end) > 1 then
                raise exception 'a JOIN has at most three branches: extra_nodes holds at most one node (df.join3), got % (at %)',
                    jsonb_array_length(v_node #> '{c,extra_nodes}'), v_where using errcode = '22023';
            end if;
            if v_type in ('THEN', 'RACE', 'JOIN', 'RETRY')
               and jsonb_typeof(v_node #> '{c,condition_node}') = 'object' then
                raise exception 'condition_node is only allowed on IF and LOOP nodes (at %)', v_where
                    using errcode = '22023';
            end if;
            if v_type = 'IF' then
                v_cfg := df._try_jsonb(v_query #>> '{}');
                -- a query that is no JSON config is that first, whatever else is wrong
                if v_query is not null and jsonb_typeof(v_cfg) is distinct from 'object' then
                    raise exception 'query in IF must be valid JSON config (at %)', v_where
                        using errcode = '22023';
                elsif jsonb_typeof(v_node #> '{c,condition_node}') = 'object' then
                    if v_query is not null then
                        raise exception 'IF node has both a condition_node and a query (at %)', v_where
                            using errcode = '22023';
                    end if;
                elsif v_query is null then
                    raise exception 'IF node needs a condition_node or a result_has_rows query (at %)',
                        v_where using errcode = '22023';
                elsif v_cfg ? 'condition_node' then
                    -- the stored (flattened) form: ids inside query are not a graph value
                    raise exception 'condition_node in IF must be a first-class Durofut field, not part of query (at %)',
                        v_where using errcode = '22023';
                elsif v_cfg ->> 'condition_type' is distinct from 'result_has_rows'
                      or jsonb_typeof(v_cfg -> 'result_name') is distinct from 'string'
                      or (v_cfg ->> 'result_name') !~ '^[A-Za-z_][A-Za-z0-9_]*$' then
                    raise exception 'query in IF must be valid JSON config: {"condition_type":"result_has_rows","result_name":<identifier>} (at %)',
                        v_where using errcode = '22023';
                elsif jsonb_path_exists(v_cfg, 'lax $.**{64}') then
                    -- as for leaves' configs: the worker could never read it
                    raise exception 'the config of an IF node nests deeper than 64 levels (at %)',
                        v_where using errcode = '54000';
                end if;
            elsif v_type = 'RETRY' then
                if df._retry_problem(v_query #>> '{}') is not null then
                    raise exception '% (at %)', df._retry_problem(v_query #>> '{}'), v_where
                        using errcode = '22023';
                end if;
            elsif v_query is not null then
                raise exception '% node cannot have a query (at %)', v_type, v_where using errcode = '22023';
            end if;
        end if;
    end loop;

    -- ids: v_count distinct random 8-hex values (collisions are re-drawn)
    loop
        select array_agg(id order by id) into v_ids
        from (select distinct right(replace(gen_random_uuid()::pg_catalog.text, '-', ''), 8) as id
              from generate_series(1, v_count)) g;
        exit when cardinality(v_ids) = v_count;
    end loop;

    with n as (
        select (e.ord)::pg_catalog.int4 as pos, e.value as w,
               array(select jsonb_array_elements_text(e.value -> 'p')::pg_catalog.int4) as path
        from jsonb_array_elements(v_walk) with ordinality e(value, ord)
    ), ided as (
        select n.*, v_ids[n.pos] as id, n.path[1:cardinality(n.path) - 1] as parent,
               n.path[cardinality(n.path)] as ord
        from n
    ), kids as (
        select c.parent, min(c.id) filter (where c.ord = 0) as cond_id,
               min(c.id) filter (where c.ord = 1) as left_id,
               min(c.id) filter (where c.ord = 2) as right_id,
               jsonb_agg(c.id order by c.ord) filter (where c.ord >= 3) as extra_ids
        from ided c
        where cardinality(c.path) > 0
        group by c.parent
    )
    select jsonb_agg(jsonb_build_object(
               'id', i.id,
               'node_type', i.w #>> '{o,node_type}',
               'query', case
                   when i.w #>> '{o,node_type}' in ('IF', 'LOOP') and k.cond_id is not null
                       then jsonb_build_object('condition_node', k.cond_id)::pg_catalog.text
                   when i.w #>> '{o,node_type}' = 'JOIN' and k.extra_ids is not null
                       then jsonb_build_object('extra_nodes', k.extra_ids)::pg_catalog.text
                   when i.w #>> '{o,node_type}' in ('THEN', 'RACE', 'JOIN', 'LOOP') then null
                   else i.w #>> '{o,query}' end,
               'result_name', i.w #>> '{o,result_name}',
               'left_node', k.left_id,
               'right_node', k.right_id)
           order by i.pos)
    into v_result
    from ided i
    left join kids k on k.parent = i.path;
    perform df._check_refs(v_result);  -- a $name no step defines (35_references.sql)
    return v_result;
end;
$$;

------------------------------------------------------------------------------------------
-- engine helpers (SECURITY DEFINER; only reachable through df.grant_usage)
------------------------------------------------------------------------------------------

-- The role that called into a SECURITY DEFINER helper (see the header). Not a definer itself
-- (it runs with the rights of the definer that calls it, so it qualifies names like one).
-- Inside a workflow step, session_user is the service's role: the step's own role comes from
-- the row the worker wrote for this very transaction (@engine@.step_sessions).
create function @engine@._invoker() returns name
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(
        (select r.rolname from @engine@.step_sessions s
         join pg_catalog.pg_roles r on r.oid = s.role
         where s.pid = pg_catalog.pg_backend_pid()
           and s.xid = pg_catalog.txid_current_if_assigned()),
        case when coalesce(pg_catalog.current_setting('role', true), 'none') in ('none', '')
             then session_user
             else pg_catalog.current_setting('role', true)::pg_catalog.name end)
$$;

-- May the calling role act on an instance submitted by p_owner? Owners, and roles that bypass
-- RLS anyway (superusers, BYPASSRLS roles), the same set df.instances shows the row to.
create function @engine@._may_act(p_owner regrole) returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select exists (select 1 from pg_catalog.pg_roles r
                   where r.rolname = @engine@._invoker()
                     and (r.oid = p_owner::pg_catalog.oid or r.rolsuper or r.rolbypassrls))
$$;

-- Was a row with this xmin written by the current transaction (or one of its subtransactions)?
-- Every transaction holds an ExclusiveLock on its own transaction ids until it ends, and rows
-- of other transactions still in progress are invisible, so a visible row whose xmin this
-- backend holds locked was written here. What proves that a SECURITY DEFINER function's owner
-- called df.start: RLS let the row be written with submitted_by = current_user, the owner
-- (docs/security.md, "df.start inside a SECURITY DEFINER function").
create function @engine@._written_here_v1(p_xmin xid) returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select exists (select 1 from pg_catalog.pg_locks l
                   where l.locktype operator(pg_catalog.=) 'transactionid'
                     and l.pid operator(pg_catalog.=) pg_catalog.pg_backend_pid()
                     and l.transactionid operator(pg_catalog.=) p_xmin
                     and l.mode operator(pg_catalog.=) 'ExclusiveLock' and l.granted)
$$;

create function @engine@._schema_ready_v1() returns integer
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$ select coalesce((select w.schema_version from @engine@._worker_ready w), 0) $$;

-- Hand a freshly written instance to the engine: the frozen vars snapshot and the first task.
-- Only for a pending instance of the caller that the engine has not seen yet, so a role cannot
-- inject vars into someone else's instance.
--
-- The stored graph is validated first, because df.start is not its only writer: every role
-- given df.grant_usage holds INSERT on df.instances/df.nodes (as in pg_durable) and may call
-- this directly. The rows must form exactly one tree from instances.root_node, with the
-- children the worker's compiler reads (pgdurable/graph/compile.py): condition_node (the id in
-- an IF/LOOP query), left_node, right_node, extra_nodes (the one id in a JOIN query). Every node
-- reachable exactly once (a cycle or a shared node would fail every load of the instance), no
-- orphans, no missing children, a nesting depth of at most 256 (the root at depth 0: 257 node
-- levels) and 10,000 nodes (df.start's limits).
-- Two set-based statements: one pass over the instance's rows (primary key prefix) checks each
-- row and builds the child map {id: [condition, left, right, extra]}; a recursive CTE walks the
-- map from the root, stopping one level past the depth limit and one row past the node count
-- (a walk longer than the node count has reached some node twice). 0.3-0.8 ms for a 100-node
-- graph on PG 15/18, against ~12 ms for the df.start that writes it (df.start calls this on
-- every start); the queries that name what is wrong run only on errors.
create function @engine@._enqueue_v1(p_instance_id varchar, p_vars jsonb) returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    c_max_depth constant pg_catalog.int4 := 256;
    c_max_nodes constant pg_catalog.int4 := 10000;
    c_roles     constant pg_catalog.text[] := array['condition_node', 'left_node', 'right_node',
                                                    'extra_nodes'];
    v_inst     record;
    v_total    pg_catalog.int8;
    v_problem  pg_catalog.text;
    v_map      pg_catalog.jsonb;
    v_rows     pg_catalog.int8;
    v_distinct pg_catalog.int8;
    v_missing  pg_catalog.text;
    v_deep     pg_catalog.text;
    v_order    pg_catalog.text[];
begin
    select i.id, i.root_node, i.status, i.submitted_by, i.database, i.xmin into v_inst
    from df.instances i where i.id = p_instance_id
    for update;
    -- the caller's own instance, or one this transaction wrote as its submitter (df.start in a
    -- SECURITY DEFINER function: the owner, whom RLS let write it)
    if not found or not (@engine@._may_act(v_inst.submitted_by)
                         or @engine@._written_here_v1(v_inst.xmin)) then
        raise exception 'Instance % not found or access denied', p_instance_id using errcode = 'P0002';
    end if;
    if v_inst.status <> 'pending' then
        raise exception 'Instance % is %, only pending instances can be enqueued', p_instance_id,
            v_inst.status using errcode = '55000';
    end if;

    -- 1. each row on its own (type, owner, child columns and composite query per node type,
    --    as compile.py checks them), and the child map
    select pg_catalog.count(*),
           (pg_catalog.array_agg(r.problem order by r.id) filter (where r.problem is not null))[1],
           pg_catalog.jsonb_object_agg(r.id, r.kids)
    into v_total, v_problem, v_map
    from (
        select x.id,
               case
                   when x.node_type is null
                        or x.node_type not in ('SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'BREAK',
                                               'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP',
                                               'HTTP_MULTIPART', 'RETRY', 'FOREACH')
                       then pg_catalog.format('node %L has an unknown node_type %L', x.id,
                                              x.node_type)
                   when x.submitted_by <> v_inst.submitted_by
                       then pg_catalog.format('node %L was submitted by %s, not by the '
                                              'instance''s role %s', x.id, x.submitted_by,
                                              v_inst.submitted_by)
                   when x.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'RETRY')
                        and (x.left_node is not null or x.right_node is not null)
                       then pg_catalog.format('node %L (%s): a leaf has no left_node/right_node',
                                              x.id, x.node_type)
                   when x.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'RETRY')
                       then null
                   when x.left_node is null
                       then pg_catalog.format('node %L (%s): left_node is missing', x.id,
                                              x.node_type)
                   when x.node_type in ('LOOP', 'RETRY') and x.right_node is not null
                       then pg_catalog.format('node %L (%s): a %s has no right_node', x.id,
                                              x.node_type, x.node_type)
                   when x.node_type not in ('LOOP', 'RETRY') and x.right_node is null
                       then pg_catalog.format('node %L (%s): right_node is missing', x.id,
                                              x.node_type)
                   when x.node_type in ('THEN', 'RACE') and x.query is not null
                       then pg_catalog.format('node %L (%s): query must be NULL', x.id, x.node_type)
                   when x.node_type = 'IF'
                        and not coalesce(x.qj ->> 'condition_type' = 'result_has_rows'
                                         or pg_catalog.jsonb_typeof(x.qj -> 'condition_node')
                                            = 'string', false)
                       then pg_catalog.format('node %L (IF): query must be {"condition_node": '
                                              '"<id>"} or a result_has_rows config', x.id)
                   when x.node_type = 'LOOP' and x.query is not null
                        and pg_catalog.jsonb_typeof(x.qj -> 'condition_node')
                            is distinct from 'string'
                       then pg_catalog.format('node %L (LOOP): query must be NULL or '
                                              '{"condition_node": "<id>"}', x.id)
                   when x.node_type = 'JOIN' and x.query is not null
                        and not coalesce(pg_catalog.jsonb_typeof(x.qj -> 'extra_nodes') = 'array'
                                         and pg_catalog.jsonb_typeof(x.qj #> '{extra_nodes,0}')
                                             = 'string'
                                         and x.qj #> '{extra_nodes,1}' is null, false)
                       then pg_catalog.format('node %L (JOIN): query must be NULL or '
                                              '{"extra_nodes": ["<id>"]} (one extra branch)', x.id)
                   when x.node_type = 'RETRY' and df._retry_problem(x.query) is not null
                       then pg_catalog.format('node %L (RETRY): %s', x.id,
                                              df._retry_problem(x.query))
                   when x.node_type = 'FOREACH' and df._foreach_problem(x.query) is not null
                       then pg_catalog.format('node %L (FOREACH): %s', x.id,
                                              df._foreach_problem(x.query))
               end as problem,
               -- the children in the compiler's order (JSON null where there is none)
               pg_catalog.jsonb_build_array(
                   case when x.node_type = 'LOOP'
                             or (x.node_type = 'IF'
                                 and x.qj ->> 'condition_type' is distinct from 'result_has_rows')
                        then x.qj ->> 'condition_node' end,
                   x.left_node, x.right_node,
                   case when x.node_type = 'JOIN' then x.qj #>> '{extra_nodes,0}' end) as kids
        from (
            select n.id, n.node_type, n.query, n.left_node, n.right_node, n.submitted_by,
                   -- the JSON object in an IF/LOOP/JOIN query (NULL when it is not JSON);
                   -- the forms df.start writes are JSON by construction: cast them without
                   -- df._try_jsonb's subtransaction
                   case when n.node_type not in ('IF', 'LOOP', 'JOIN') or n.query is null
                            then null
                        when n.query ~ ('^\{"(condition_node": "[0-9a-f]{8}"'
                                        '|extra_nodes": \["[0-9a-f]{8}"\]'
                                        '|condition_type":"result_has_rows",'
                                        '"result_name":"[A-Za-z_][A-Za-z0-9_]*")\}$')
                            then n.query::pg_catalog.jsonb
                        else df._try_jsonb(n.query) end as qj
            from df.nodes n
            where n.instance_id = p_instance_id
            offset 0  -- a fence: qj is computed once per row, not once per use below
        ) x
    ) r;
    if v_total > c_max_nodes then
        v_problem := pg_catalog.format('54000 it has %s nodes, more than %s', v_total, c_max_nodes);
    elsif not coalesce(v_map ? v_inst.root_node, false) then
        v_problem := pg_catalog.format('22023 root node %L is not a node of the instance',
                                       v_inst.root_node);
    elsif v_problem is not null then
        v_problem := '22023 ' || v_problem;
    else
        -- 2. the walk from the root (it comes out level by level: v_order is in depth order)
        with recursive walk(id, depth) as (
            select v_inst.root_node::pg_catalog.text, 0
            union all
            select k.child, w.depth + 1
            from walk w
            cross join lateral pg_catalog.jsonb_array_elements_text(v_map -> w.id) k(child)
            where k.child is not null and w.depth <= c_max_depth
        )
        select pg_catalog.count(*), pg_catalog.count(distinct r.id),
               (pg_catalog.array_agg(r.id) filter (where not v_map ? r.id))[1],
               (pg_catalog.array_agg(r.id order by r.id) filter (where r.depth > c_max_depth))[1],
               pg_catalog.array_agg(r.id)
        into v_rows, v_distinct, v_missing, v_deep, v_order
        from (select w.id, w.depth from walk w limit v_total + 1) r;
        -- 3. only on errors: name what is wrong
        if v_missing is not null then
            select pg_catalog.format('22023 node %L (%s) refers to %L (%s), which is not a node of '
                                     'the instance', e.key, n.node_type, k.child, c_roles[k.ord])
            into v_problem
            from pg_catalog.jsonb_each(v_map) e
            cross join lateral pg_catalog.jsonb_array_elements_text(e.value)
                with ordinality k(child, ord)
            join df.nodes n on n.instance_id = p_instance_id and n.id = e.key
            where k.child = v_missing
            order by e.key, k.ord limit 1;
        elsif v_rows > v_distinct then
            select pg_catalog.format('22023 node %L is reachable twice (a cycle or a shared node)',
                                     u.id)
            into v_problem
            from pg_catalog.unnest(v_order) with ordinality u(id, pos)
            group by u.id having pg_catalog.count(*) > 1
            order by (pg_catalog.array_agg(u.pos order by u.pos))[2], u.id limit 1;
        elsif v_deep is not null then
            v_problem := pg_catalog.format('54000 it nests deeper than the maximum nesting depth '
                                           'of %s (at node %L)', c_max_depth, v_deep);
        elsif v_distinct < v_total then
            select pg_catalog.format('22023 node %L is not reachable from the root %L (an orphan)',
                                     k.id, v_inst.root_node)
            into v_problem
            from pg_catalog.jsonb_object_keys(v_map) k(id)
            where k.id <> all (v_order)
            order by k.id limit 1;
        end if;
    end if;
    if v_problem is not null then
        -- v_problem: '<SQLSTATE> <message>'
        raise exception 'invalid stored graph for instance %: %', p_instance_id,
            pg_catalog.substr(v_problem, 7)
            using errcode = pg_catalog.left(v_problem, 5),
                  hint = 'The rows of an instance must form one tree from its root_node, as '
                         'df.start writes them; build graphs with df.start.';
    end if;

    insert into @engine@.runs (instance_id, vars) values (p_instance_id, coalesce(p_vars, '{}'))
    on conflict (instance_id) do nothing;
    if not found then
        raise exception 'Instance % was already handed to the engine', p_instance_id
            using errcode = '55000';
    end if;
    insert into @engine@.tasks (instance_id, node_id, gen, kind, due_at, submitted_by, database)
    values (p_instance_id, v_inst.root_node, 0, 'start', pg_catalog.now(), v_inst.submitted_by,
            v_inst.database);
end;
$$;

-- df.signal's write: durable inbox row + wake the instance's signal waits (the worker re-parks
-- a wait that finds no signal of its name, tasks.deadline keeps its timeout). Locks the runs
-- row first, like every writer of an instance (50_engine.sql lock order).
create function @engine@._signal_v1(p_instance_id varchar, p_name text, p_data jsonb) returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_owner  pg_catalog.regrole;
    v_status pg_catalog.text;
    v_max    pg_catalog.int8 := @engine@.setting('max_signal_bytes', '10485760')::pg_catalog.int8;
    v_size   pg_catalog.int8 := pg_catalog.octet_length(p_data::pg_catalog.text);
begin
    -- pg_durable.max_signal_bytes, but never more than one checkpoint carries (64 MiB,
    -- pgdurable/values.py CHECKPOINT_MAX_BYTES), whatever a session sets; 0 = that bound
    if v_max <= 0 or v_max > 67108864 then
        v_max := 67108864;
    end if;
    -- the stored form, as the worker will read it (df.signal measured the text it was given)
    if v_size > v_max then
        raise exception 'df.signal: data is % bytes, over the limit of % bytes', v_size, v_max
            using errcode = '54000',
                  hint = 'signal data becomes the wait''s result and is capped like a step result '
                         '(pg_durable.max_signal_bytes): send a key to data kept in a table';
    end if;
    if pg_catalog.jsonb_path_exists(p_data, 'lax $.**{256}') then
        raise exception 'df.signal: data nests deeper than 256 levels' using errcode = '54000';
    end if;
    perform 1 from @engine@.runs r where r.instance_id = p_instance_id for update;
    select i.submitted_by, i.status into v_owner, v_status
    from df.instances i where i.id = p_instance_id;
    if v_owner is null or not @engine@._may_act(v_owner) then
        raise exception 'Instance not found or access denied: %', p_instance_id using errcode = 'P0002';
    end if;
    if v_status in ('completed', 'failed', 'cancelled') then
        raise exception 'Instance % is already %; signals can only be sent to pending or running instances',
            p_instance_id, v_status using errcode = '55000';
    end if;
    insert into @engine@.signals (instance_id, name, data) values (p_instance_id, p_name, p_data);
    update @engine@.tasks t set due_at = pg_catalog.now()
    where t.instance_id = p_instance_id and t.kind = 'signal' and t.lease_owner is null;
    perform pg_catalog.pg_notify('pgdurable_work', '');  -- no payload: LISTEN is open to all
end;
$$;

-- df.cancel's write (docs/decisions.md D16/D17). Lock order as every writer: runs row, then the instance.
create function @engine@._cancel_v1(p_instance_id varchar, p_reason text) returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_owner  pg_catalog.regrole;
    v_status pg_catalog.text;
begin
    perform 1 from @engine@.runs r where r.instance_id = p_instance_id for update;
    select i.submitted_by, i.status into v_owner, v_status
    from df.instances i where i.id = p_instance_id
    for update;
    if v_owner is null or not @engine@._may_act(v_owner) then
        raise exception 'Instance not found or access denied: %', p_instance_id using errcode = 'P0002';
    end if;
    if v_status in ('completed', 'failed', 'cancelled') then
        -- terminal states are sticky: report, change nothing
        return pg_catalog.format('Instance %s is already %s', p_instance_id, v_status);
    end if;
    update df.instances i set status = 'cancelled', updated_at = pg_catalog.now(),
                              completed_at = pg_catalog.now()
    where i.id = p_instance_id;
    update @engine@.runs r set cancel_reason = p_reason where r.instance_id = p_instance_id;
    delete from @engine@.tasks t where t.instance_id = p_instance_id;
    -- failed, as pg_durable has them, and marked abandoned: df.instance_nodes and df.explain
    -- show them skipped (⊘), stopped by the cancel, not failed by their own doing (✗)
    update df.nodes n
    set status = 'failed', result = pg_catalog.to_jsonb('cancelled: ' || p_reason),
        status_details = coalesce(n.status_details, '{}'::pg_catalog.jsonb)
                         || '{"abandoned": true}'::pg_catalog.jsonb,
        updated_at = pg_catalog.now()
    where n.instance_id = p_instance_id and n.status = 'running';
    -- the worker running a step of this instance interrupts it (pg_cancel_backend)
    perform pg_catalog.pg_notify('pgdurable_cancel', '');  -- no payload: LISTEN is open to all
    return pg_catalog.format('Instance %s cancelled: %s', p_instance_id, p_reason);
end;
$$;

-- transaction_mode 'new' needs the dblink extension. pgdurable install creates it, when the
-- installing role may (a superuser, a managed cloud's admin role), in @engine@_dblink: a
-- schema of the engine's owner on which no other role has USAGE or CREATE, so no tenant can
-- call dblink's functions through it or put look-alikes beside them (tenants keep exactly
-- what PostgreSQL grants them where an administrator installed dblink elsewhere). An
-- administrator may have created it in any schema: wherever it is, the four functions 'new'
-- mode calls must be the extension's own members (a schema's owner could add functions
-- beside them; every call passes pg_catalog.text arguments, so only these exact signatures
-- can be chosen). Returns the schema; raises 55000 with the statement an administrator must
-- run when dblink is missing. Not SECURITY DEFINER: called by the definers below.
create function @engine@._dblink_v1() returns name
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_ext    pg_catalog.oid;
    v_schema pg_catalog.name;
    v_fn     pg_catalog.text;
    v_stmt   pg_catalog.text := 'CREATE EXTENSION dblink SCHEMA @engine@_dblink;';
begin
    select e.oid, n.nspname into v_ext, v_schema
    from pg_catalog.pg_extension e
    join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) e.extnamespace
    where e.extname operator(pg_catalog.=) 'dblink';
    if v_ext is null then
        if not exists (select 1 from pg_catalog.pg_namespace n
                       where n.nspname operator(pg_catalog.=) '@engine@_dblink') then
            v_stmt := 'CREATE SCHEMA @engine@_dblink AUTHORIZATION pgdurable_owner; '
                      'REVOKE ALL ON SCHEMA @engine@_dblink FROM PUBLIC; ' || v_stmt;
        end if;
        raise exception 'transaction_mode ''new'' needs the dblink extension, which database "%" does not have; an administrator (a superuser, or the managed cloud''s admin role such as rds_superuser) must run in that database: %',
            pg_catalog.current_database(), v_stmt
            using errcode = '55000',
                  hint = 'pgdurable install creates it when the installing role may; on stock PostgreSQL only a superuser can create dblink. Until then, use transaction_mode => ''caller''.';
    end if;
    if not pg_catalog.has_schema_privilege(v_schema, 'USAGE') then
        raise exception 'transaction_mode ''new'': the dblink extension is in schema "%", on which % has no USAGE; an administrator must run: GRANT USAGE ON SCHEMA % TO %',
            v_schema, current_user, pg_catalog.quote_ident(v_schema), current_user
            using errcode = '55000';
    end if;
    foreach v_fn in array array['dblink_connect(pg_catalog.text,pg_catalog.text)',
                                'dblink_exec(pg_catalog.text,pg_catalog.text)',
                                'dblink(pg_catalog.text,pg_catalog.text)',
                                'dblink_disconnect(pg_catalog.text)'] loop
        if not exists (
            select 1 from pg_catalog.pg_depend d
            where d.classid operator(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
              and d.objid operator(pg_catalog.=)
                  pg_catalog.to_regprocedure(pg_catalog.quote_ident(v_schema) || '.' || v_fn)
              and d.refclassid operator(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
              and d.refobjid operator(pg_catalog.=) v_ext
              and d.deptype operator(pg_catalog.=) 'e') then
            raise exception 'transaction_mode ''new'': %.% is not a function of the dblink extension', v_schema, v_fn
                using errcode = '55000',
                      hint = 'update or re-create the extension: ALTER EXTENSION dblink UPDATE';
        end if;
    end loop;
    return v_schema;
end;
$$;

-- Open the launch session: the dblink connection p_name, logged in as this install's launcher
-- role (pgdurable install made it: LOGIN, member of nothing, its password in
-- @engine@.launcher, which only the engine's owner reads), to this server the way the caller
-- reached it: its TCP address, else the first socket directory. dblink lets a non-superuser
-- open a connection only with a password the server asked for: where the server trusts the
-- launcher role (pg_hba 'trust'), this fails (28000) saying what to change. Not SECURITY
-- DEFINER: called by the definers @engine@._new_start_v1 and @engine@._new_mode_check_v1.
create function @engine@._launch_connect_v1(p_dblink name, p_name text) returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_launcher record;
    v_host     pg_catalog.text;
    v_conn     pg_catalog.text;
begin
    select l.rolname, l.password into v_launcher from @engine@.launcher l;
    if not found then
        raise exception 'transaction_mode ''new'' needs the launcher role that pgdurable install makes; run pgdurable install again'
            using errcode = '55000';
    end if;
    v_host := coalesce(pg_catalog.host(pg_catalog.inet_server_addr()),
                       nullif(pg_catalog.btrim(pg_catalog.split_part(
                           pg_catalog.current_setting('unix_socket_directories'), ',', 1)), ''),
                       '127.0.0.1');
    v_conn := pg_catalog.format('dbname=%s user=%s password=%s host=%s port=%s application_name=%s',
                     pg_catalog.quote_literal(pg_catalog.current_database()),
                     pg_catalog.quote_literal(v_launcher.rolname),
                     pg_catalog.quote_literal(v_launcher.password),
                     pg_catalog.quote_literal(v_host),
                     coalesce(pg_catalog.inet_server_port()::pg_catalog.text,
                              pg_catalog.current_setting('port')),
                     pg_catalog.quote_literal('pgdurable df.start new'));
    begin
        execute pg_catalog.format('select %I.dblink_connect($1::pg_catalog.text, $2::pg_catalog.text)',
                                  p_dblink)
            using p_name, v_conn;
    exception when others then
        if sqlerrm like '%password is required%' or sqlerrm like '%password or GSSAPI%' then
            raise exception 'transaction_mode ''new'': this server lets the launcher role % in without a password, and dblink refuses that to anyone but a superuser', v_launcher.rolname
                using errcode = '28000',
                      hint = pg_catalog.format('make pg_hba.conf ask %s for its password (scram-sha-256), as managed PostgreSQL does: lines "host all %s all scram-sha-256" and "local all %s scram-sha-256" before the trust lines, then SELECT pg_reload_conf()',
                                               v_launcher.rolname, v_launcher.rolname, v_launcher.rolname);
        end if;
        raise exception 'transaction_mode ''new'': cannot open the launch session: %', sqlerrm
            using errcode = '08001';
    end;
end;
$$;

-- Can transaction_mode 'new' work here? NULL when it can; else what is wrong and what to run
-- (the errors df.start(…, transaction_mode => 'new') would raise). pgdurable install and serve
-- ask, to say so at once. Opens and closes a launch session as the engine's owner, a
-- non-superuser, exactly as @engine@._new_start_v1 does.
create function @engine@._new_mode_check_v1() returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_dblink pg_catalog.name;
    v_name   pg_catalog.text := 'pgdurable_check_' || pg_catalog.pg_backend_pid();
    v_hint   pg_catalog.text;
begin
    v_dblink := @engine@._dblink_v1();
    perform @engine@._launch_connect_v1(v_dblink, v_name);
    execute pg_catalog.format('select %I.dblink_disconnect($1::pg_catalog.text)', v_dblink)
        using v_name;
    return null;
exception when others then
    get stacked diagnostics v_hint = pg_exception_hint;
    return sqlerrm || case when coalesce(v_hint, '') = '' then '' else ' (' || v_hint || ')' end;
end;
$$;

-- transaction_mode 'new': start the instance in a session of its own and commit it there,
-- whatever the caller's transaction does. That session is a dblink connection logged in as
-- this install's launcher role (@engine@._launch_connect_v1), which may call only
-- @engine@._launch_v1: the caller's identity was checked here, the instance is the caller's.
-- At most pg_durable.max_new_transaction_starts launches at once: rows 'launch:<n>' of
-- @engine@.locks, held by a subtransaction that ends with the launch.
create function @engine@._new_start_v1(p_role name, p_fut text, p_label text, p_database text)
returns varchar
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_dblink   pg_catalog.name;
    v_name     pg_catalog.text := 'pgdurable_start_' || pg_catalog.pg_backend_pid();
    v_id       pg_catalog.varchar;
    v_slots    pg_catalog.int4 := greatest(1,
                   @engine@.setting('max_new_transaction_starts', '2')::pg_catalog.int4);
    v_timeout  pg_catalog.numeric := greatest(1,
                   @engine@.setting('new_transaction_start_timeout', '5')::pg_catalog.numeric);
    v_deadline pg_catalog.timestamptz;
begin
    if p_role is distinct from @engine@._invoker() then
        raise exception 'transaction_mode ''new'' must be called directly by the submitting role (%)', p_role
            using errcode = '42501';
    end if;
    v_dblink := @engine@._dblink_v1();
    v_deadline := pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => v_timeout);
    begin
        -- a launch slot, held by this subtransaction (ended below, right after the launch)
        loop
            perform 1 from @engine@.locks l
            where l.name = any (select 'launch:' || g from pg_catalog.generate_series(0, v_slots - 1) g)
            limit 1
            for update skip locked;
            exit when found;
            if pg_catalog.clock_timestamp() >= v_deadline then
                raise exception 'Timed out after %s waiting for a launch slot (pg_durable.max_new_transaction_starts=%)',
                    v_timeout, v_slots using errcode = '55P03';
            end if;
            perform pg_catalog.pg_sleep(0.1);
        end loop;
        perform @engine@._launch_connect_v1(v_dblink, v_name);
        begin
            execute pg_catalog.format('select %I.dblink_exec($1::pg_catalog.text, $2::pg_catalog.text)',
                                      v_dblink)
                using v_name, 'set lock_timeout = ''30s''; set statement_timeout = ''30s''; '
                              -- df.start's idempotency_key, for @engine@._start_v1 there
                              || pg_catalog.format('set pgdurable.start_key = %L',
                                                   coalesce(pg_catalog.current_setting('pgdurable.start_key', true), ''));
            execute pg_catalog.format('select t.id from %I.dblink($1::pg_catalog.text, $2::pg_catalog.text) as t(id pg_catalog.varchar)',
                                      v_dblink)
                into v_id
                using v_name,
                      pg_catalog.format('select %I._launch_v1(%s, %L, %L, %L)', '@engine@',
                                        (select r.oid from pg_catalog.pg_roles r where r.rolname = p_role),
                                        p_fut, p_label, p_database);
            execute pg_catalog.format('select %I.dblink_disconnect($1::pg_catalog.text)', v_dblink)
                using v_name;
        exception when others then
            execute pg_catalog.format('select %I.dblink_disconnect($1::pg_catalog.text)', v_dblink)
                using v_name;
            raise;
        end;
        -- end the subtransaction (releasing the slot); v_id keeps its value
        raise exception 'launched' using errcode = 'PGDLN';
    exception when sqlstate 'PGDLN' then
        null;
    end;
    return v_id;
end;
$$;

------------------------------------------------------------------------------------------
-- df.start
------------------------------------------------------------------------------------------

-- The body of df.start for a role (see df.start below).
create function @engine@._start_v1(p_me pg_catalog.regrole, fut text, label text, database text,
                                   p_dry boolean default false)
returns varchar
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_graph    pg_catalog.jsonb;
    v_nodes    pg_catalog.jsonb;
    v_me       pg_catalog.regrole;
    v_role     record;
    v_id       pg_catalog.varchar;
    v_tries    pg_catalog.int4 := 0;
    v_vars     pg_catalog.jsonb;
    -- df.start's idempotency_key, handed over in a setting of this transaction (and through
    -- the launch session for transaction_mode 'new'); NULL: none
    v_key      pg_catalog.text := nullif(pg_catalog.current_setting('pgdurable.start_key', true), '');
begin
    if octet_length(v_key) > 512 then
        raise exception 'idempotency_key is too long (% bytes; at most 512)', octet_length(v_key)
            using errcode = '22023';
    end if;
    -- labels are indexed (btree rows stop near 2.7 kB): say so instead of an index error
    if octet_length(label) > 1024 then
        raise exception 'label is too long (% bytes; at most 1024): %…', octet_length(label),
            left(label, 40) using errcode = '22023';
    end if;
    -- 1. strict parse
    if fut is null then
        raise exception 'df.start: fut must not be NULL' using errcode = '22023';
    end if;
    if fut in ('OK', 'completed', 'failed', 'cancelled') then
        -- the texts df.setvar/unsetvar/clearvars/await_instance return (same rule as df._node)
        raise exception 'the result of df.setvar/df.unsetvar/df.clearvars/df.await_instance cannot be used as a workflow step (got %)',
            quote_literal(fut) using errcode = '22023';
    end if;
    v_graph := df._graph_value(fut);
    -- 2. target database
    if database is not null
       and not exists (select 1 from pg_catalog.pg_database d where d.datname = database) then
        raise exception 'database "%" does not exist', database using errcode = '3D000';
    end if;
    -- 3. identity: the submitting role must be able to log in, and not be a superuser unless allowed
    select r.oid, r.rolname, r.rolcanlogin, r.rolsuper into v_role
    from pg_catalog.pg_roles r where r.oid = p_me::pg_catalog.oid;
    v_me := p_me;
    if not v_role.rolcanlogin then
        raise exception 'role "%" cannot submit durable functions: it lacks the LOGIN attribute', v_role.rolname
            using errcode = '42501',
                  hint = 'steps run as the submitting role; ALTER ROLE ... LOGIN or submit as another role';
    end if;
    if v_role.rolsuper and lower(@engine@.setting('enable_superuser_instances', 'off'))
                           not in ('on', 'true', 'yes', '1') then
        raise exception 'superuser "%" cannot submit durable functions while pg_durable.enable_superuser_instances is off',
            v_role.rolname using errcode = '42501',
                               hint = 'submit as an ordinary role given df.grant_usage';
    end if;
    -- df.start in a SECURITY DEFINER function submits as the function's owner (current_user
    -- there, not the session's role), as pg_durable does: that role's step runner must exist,
    -- checked now rather than at its first step (a workflow step runs in its tenant's runner)
    if v_role.rolname operator(pg_catalog.=) current_user
       and current_user operator(pg_catalog.<>)
           coalesce(nullif(pg_catalog.current_setting('role', true), 'none'), session_user)
       and not @engine@.in_workflow()
       and not @engine@._runner_ok_v1(v_role.oid) then
        raise exception 'role "%" cannot submit durable functions: it has no step runner (df.grant_usage was not run for it); df.start runs as "%" here (the owner of the SECURITY DEFINER function that called it, for session role "%")',
            v_role.rolname, v_role.rolname, session_user
            using errcode = '42501',
                  hint = pg_catalog.format('an administrator runs: select df.grant_usage(%L)', v_role.rolname);
    end if;
    -- 4. readiness (docs/decisions.md D3)
    if @engine@._schema_ready_v1() < 1 then
        raise exception 'pg_durable background worker not yet initialized — try again in a moment'
            using errcode = '55000';
    end if;
    -- 5. validate + flatten (raises before anything is written)
    v_nodes := df._graph_flatten(v_graph);

    if p_dry then
        return null;
    end if;

    -- 6. an idempotency key (df.start sets it for this call): the role's instance started
    --    with it before, whatever its status, is the answer and nothing is written
    if v_key is not null then
        select i.id into v_id from df.instances i
        where i.submitted_by operator(pg_catalog.=) v_me
          and i.idempotency_key operator(pg_catalog.=) v_key;
        if v_id is not null then
            return v_id;
        end if;
    end if;
    -- 7. reserve an instance id: ON CONFLICT sees every row (past RLS), so ids stay global.
    --    With a key, a concurrent start with the same key makes this insert wait on the key's
    --    unique index and then do nothing once the other commits: its instance is the answer.
    --    (No subtransaction here: the row must carry this transaction's xid, which
    --    @engine@._enqueue_v1 checks for df.start in a SECURITY DEFINER function.)
    loop
        v_tries := v_tries + 1;
        insert into df.instances (id, label, root_node, submitted_by, database, idempotency_key)
        values (right(replace(gen_random_uuid()::pg_catalog.text, '-', ''), 8), label,
                v_nodes -> 0 ->> 'id', v_me, database, v_key)
        on conflict do nothing
        returning id into v_id;
        exit when v_id is not null;
        if v_key is not null then
            select i.id into v_id from df.instances i
            where i.submitted_by operator(pg_catalog.=) v_me
              and i.idempotency_key operator(pg_catalog.=) v_key;
            if v_id is not null then
                return v_id;
            end if;
            if v_tries > 1 then  -- e.g. a REPEATABLE READ snapshot older than the other start
                raise exception 'an instance with idempotency key % is being started by another transaction; retry',
                    pg_catalog.quote_literal(v_key) using errcode = '40001';
            end if;
        end if;
        if v_tries > 10 then
            raise exception 'could not reserve an instance id after 10 attempts' using errcode = '55000';
        end if;
    end loop;
    -- 8. all nodes in one statement (FKs are deferred to commit)
    insert into df.nodes (id, instance_id, node_type, query, result_name, left_node, right_node,
                          submitted_by, database)
    select n.id, v_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, v_me, database
    from jsonb_to_recordset(v_nodes)
         as n(id pg_catalog.varchar, node_type pg_catalog.text, query pg_catalog.text,
              result_name pg_catalog.text, left_node pg_catalog.varchar,
              right_node pg_catalog.varchar);
    -- 9. the vars snapshot (this transaction's view: own uncommitted rows included)
    select coalesce(jsonb_object_agg(v.name, v.value), '{}') into v_vars
    from df.vars v where v.owner = v_me;
    perform df._check_vars(v_nodes, v_vars);  -- a {var} it does not hold (35_references.sql)
    -- 10. the engine's first task, then wake a worker (delivered at commit)
    perform @engine@._enqueue_v1(v_id, v_vars);
    perform pg_catalog.pg_notify('pgdurable_work', '');  -- no payload: LISTEN is open to all
    return v_id;
end;
$$;


-- df.start: checks and writes in the caller's own transaction (caller mode), or in a session
-- of its own (transaction_mode 'new', @engine@._new_start_v1). The work is
-- @engine@._start_v1, for a role: here the caller (RLS admits only its own rows), in the
-- launch session the role that @engine@._new_start_v1 vouched for.
create function df.start(fut text, label text default null, database text default null,
                         transaction_mode text default 'caller', idempotency_key text default null)
returns text
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_mode pg_catalog.text := lower(btrim(coalesce(transaction_mode, '')));
    v_me   pg_catalog.regrole := (select r.oid::pg_catalog.regrole from pg_catalog.pg_roles r
                                  where r.rolname = current_user);
    v_id   pg_catalog.text;
begin
    -- the key travels to @engine@._start_v1 in a setting of this transaction (set every time:
    -- a role default of the name cannot reach it)
    perform pg_catalog.set_config('pgdurable.start_key', coalesce(idempotency_key, ''), true);
    if idempotency_key operator(pg_catalog.=) '' then
        raise exception 'idempotency_key must not be empty (NULL: no key)' using errcode = '22023';
    end if;
    if v_mode not in ('caller', 'new') then
        raise exception 'invalid transaction_mode ''%'': expected ''caller'' or ''new''', transaction_mode
            using errcode = '22023';
    end if;
    if v_mode = 'new' then
        if @engine@.in_workflow() then
            raise exception 'df.start(transaction_mode => ''new'') cannot be called inside a workflow'
                using errcode = '0A000';
        end if;
        if current_user operator(pg_catalog.<>)
               coalesce(nullif(pg_catalog.current_setting('role', true), 'none'), session_user) then
            -- the launch session acts for the session's role, which here is not current_user
            raise exception 'df.start(transaction_mode => ''new'') cannot be called inside a SECURITY DEFINER function (it runs as "%" for session role "%")', current_user, session_user
                using errcode = '0A000',
                      hint = 'use transaction_mode => ''caller'' there: the instance is submitted as the function''s owner and commits with the calling transaction';
        end if;
        -- every check here, in the caller's session, so errors read as in caller mode
        perform @engine@._start_v1(v_me, fut, label, database, true);
        v_id := @engine@._new_start_v1(current_user, fut, label, database);
    else
        v_id := @engine@._start_v1(v_me, fut, label, database);
    end if;
    perform pg_catalog.set_config('pgdurable.start_key', '', true);
    return v_id;
end;
$$;


------------------------------------------------------------------------------------------
-- signal, cancel, status, result, error, await
------------------------------------------------------------------------------------------

-- Signal data is capped like a step result (it becomes the wait's result):
-- pg_durable.max_signal_bytes (default 10 MiB, as serve's --result-max-bytes), and never more
-- than 64 MiB, whatever a session sets; nested at most 256 levels. @engine@._signal_v1 checks
-- the stored form again (any granted role may call it directly), and the worker checks its
-- own cap before it reads the data.
create function df.signal(instance_id text, signal_name text, signal_data text default '{}')
returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
declare
    v_data pg_catalog.jsonb;
    v_max  pg_catalog.int8 := @engine@.setting('max_signal_bytes', '10485760')::pg_catalog.int8;
begin
    if v_max <= 0 or v_max > 67108864 then
        v_max := 67108864;  -- never more than one checkpoint carries (as _signal_v1)
    end if;
    if coalesce(instance_id, '') = '' or coalesce(signal_name, '') = '' then
        raise exception 'df.signal: instance_id and signal_name must be non-empty' using errcode = '22023';
    end if;
    -- at once, before the text is parsed or anything is looked up
    if octet_length(signal_data) > v_max then
        raise exception 'df.signal: data is % bytes, over the limit of % bytes', octet_length(signal_data), v_max
            using errcode = '54000',
                  hint = 'signal data becomes the wait''s result and is capped like a step result '
                         '(pg_durable.max_signal_bytes): send a key to data kept in a table';
    end if;
    -- visibility under RLS is the ownership check users see
    if not exists (select 1 from df.instances i where i.id = instance_id) then
        raise exception 'Instance not found or access denied: %', instance_id using errcode = 'P0002';
    end if;
    v_data := coalesce(df._try_jsonb(signal_data), to_jsonb(signal_data), 'null'::pg_catalog.jsonb);
    perform @engine@._signal_v1(instance_id, signal_name, v_data);
    return 'OK';
end;
$$;

create function df.cancel(instance_id text, reason text default 'Cancelled by user')
returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
begin
    if not exists (select 1 from df.instances i where i.id = instance_id) then
        raise exception 'Instance not found or access denied: %', instance_id using errcode = 'P0002';
    end if;
    return @engine@._cancel_v1(instance_id, coalesce(reason, 'Cancelled by user'));
end;
$$;

create function df.status(instance_id text) returns text
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$ select i.status from df.instances i where i.id = $1 $$;

-- A node's result as every reader shows it (df.result, df.instance_nodes, df.explain, …).
-- The worker stores each value once (ARCHITECTURE §4): a leaf's on its row; a completed
-- composite's result is NULL and its status_details refer to where the value is:
-- "result_from": "<id>" (THEN/IF/RACE/LOOP, a break: the node whose value it has) or
-- "result_of": ["<id>", …] (JOIN: the array of its branches' values, in order). This returns
-- what the row held when composites stored copies, byte for byte the same jsonb: references
-- are followed (only from completed nodes), JOIN arrays built, iteratively (an explicit
-- stack: chains nest up to 256 deep). A node that is not completed, or a row without
-- references (older rows hold copies), gives its own result. Read under the caller's RLS.
create function df._node_result(p_instance text, p_node text) returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    -- node ids to resolve, top = last; '#k' = build the array of the last k values
    v_todo  pg_catalog.text[] := array[p_node];
    v_vals  pg_catalog.jsonb[] := '{}';
    v_id    pg_catalog.text;
    v_n     record;
    v_k     pg_catalog.int4;
    v_top   pg_catalog.int4;
    v_steps pg_catalog.int4 := 0;
begin
    while cardinality(v_todo) > 0 loop
        v_top := cardinality(v_todo);
        v_id := v_todo[v_top];
        v_todo := v_todo[1:v_top - 1];
        if left(v_id, 1) = '#' then
            v_k := substr(v_id, 2)::pg_catalog.int4;
            v_top := cardinality(v_vals);
            v_vals := array_append(v_vals[1:v_top - v_k],
                (select coalesce(jsonb_agg(u.x order by u.o), '[]'::pg_catalog.jsonb)
                 from unnest(v_vals[v_top - v_k + 1:v_top]) with ordinality u(x, o)));
            continue;
        end if;
        v_steps := v_steps + 1;
        if v_steps > 100000 then
            return null;  -- references that do not end (never written by the worker)
        end if;
        select n.status, n.result, n.status_details -> 'result_from' as rf,
               n.status_details -> 'result_of' as ro
        into v_n
        from df.nodes n where n.instance_id = p_instance and n.id = v_id;
        if not found then
            v_vals := array_append(v_vals, null::pg_catalog.jsonb);
        elsif v_n.status = 'completed' and jsonb_typeof(v_n.rf) = 'string' then
            v_todo := array_append(v_todo, v_n.rf #>> '{}');
        elsif v_n.status = 'completed' and jsonb_typeof(v_n.ro) = 'array' then
            -- the marker under the branches, pushed last-first: the first branch resolves first
            v_todo := array_append(v_todo, '#' || jsonb_array_length(v_n.ro))
                      || array(select e.id from jsonb_array_elements_text(v_n.ro)
                                    with ordinality e(id, o) order by e.o desc);
        else
            v_vals := array_append(v_vals, v_n.result);
        end if;
    end loop;
    return v_vals[1];
end;
$$;

-- The root node's result, only for a completed instance (docs/api.md: not the error of a failed one).
create function df.result(instance_id text) returns text
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$
    select df._node_result(i.id, i.root_node)::pg_catalog.text
    from df.instances i
    where i.id = $1 and i.status = 'completed'
$$;

-- The failing node of a failed instance: a failed node none of whose children failed (the
-- leaf where the failure started; children include the ids inside IF/LOOP/JOIN query config);
-- with several (JOIN branches) the one that finished first.
create function df.error(instance_id text) returns jsonb
language sql stable strict
set search_path = pg_catalog, pg_temp
as $$
    with inst as (
        select i.id from df.instances i where i.id = $1 and i.status = 'failed'
    ), failed as (
        select n.* from df.nodes n join inst on n.instance_id = inst.id where n.status = 'failed'
    ), origin as (
        -- the worker stamps every failed composite with the node the failure started at
        select f.* from failed f
        join df.instances i on i.id = f.instance_id
        join df.nodes r on r.instance_id = i.id and r.id = i.root_node
        where f.id = r.status_details ->> 'error_node'
    ), leaf as (
        select * from origin
        union all
        (select f.* from failed f
        where not exists (select 1 from origin)
          and coalesce((f.status_details ->> 'abandoned')::pg_catalog.bool, false) = false
          and not exists (
            select 1 from failed c
            where c.id in (f.left_node, f.right_node)
               or (f.node_type in ('IF', 'LOOP', 'JOIN') and f.query like '{%'
                   and (df._try_jsonb(f.query) ->> 'condition_node' = c.id
                        or coalesce(df._try_jsonb(f.query) -> 'extra_nodes', '[]') ? c.id)))
        order by f.status_details ->> 'finished_at' nulls last, f.updated_at, f.id
        limit 1)
    )
    select case when exists (select 1 from inst) then
        coalesce((select jsonb_build_object('node_id', l.id, 'node_type', l.node_type,
                                            'error', l.result #>> '{}',
                                            'sqlstate', l.status_details ->> 'sqlstate')
                  from leaf l),
                 jsonb_build_object('node_id', null, 'node_type', null,
                                    'error', 'the instance failed before any node ran',
                                    'sqlstate', null))
    end
$$;

-- Poll df.instances every 100 ms (each query of a plpgsql loop takes a fresh snapshot under
-- READ COMMITTED; under REPEATABLE READ the status cannot change and this times out).
create function df.await_instance(instance_id text, timeout_seconds integer default 30)
returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
declare
    v_status   pg_catalog.text;
    v_deadline pg_catalog.timestamptz;
begin
    if @engine@.in_workflow() then
        raise exception 'df.await_instance cannot be called inside a workflow' using errcode = '0A000';
    end if;
    if timeout_seconds is null or timeout_seconds <= 0 then
        raise exception 'timeout_seconds must be positive, got %', timeout_seconds using errcode = '22023';
    end if;
    v_deadline := clock_timestamp() + make_interval(secs => timeout_seconds);
    loop
        select i.status into v_status from df.instances i where i.id = instance_id;
        if v_status is null then
            raise exception 'Instance not found or access denied: %', instance_id using errcode = 'P0002';
        end if;
        if v_status in ('completed', 'failed', 'cancelled') then
            return v_status;
        end if;
        if clock_timestamp() >= v_deadline then
            raise exception 'Timed out after %s waiting for instance % (status: %)', timeout_seconds,
                instance_id, v_status using errcode = '57014';
        end if;
        perform pg_sleep(0.1);
    end loop;
end;
$$;

create function df.wait_for_completion(instance_id text, timeout_seconds integer default 30)
returns text
language plpgsql volatile strict
set search_path = pg_catalog, pg_temp
as $$
begin
    raise warning 'df.wait_for_completion is deprecated; use df.await_instance';
    return df.await_instance(instance_id, timeout_seconds);
end;
$$;
