-- pgdurable schema, part 10: the DSL (docs/api.md, ARCHITECTURE.md §1).
--
-- Every function here builds a graph value: text holding one compact JSON object
-- {"node_type", "query"?, "result_name"?, "condition_node"?, "left_node"?, "right_node"?,
-- "extra_nodes"?} with keys in that order. Nothing is stored: df.start flattens and
-- validates the whole value later. The functions are pure (IMMUTABLE, no table access) and
-- run with search_path = pg_catalog, pg_temp, so they behave the same under any caller
-- search_path: pg_temp listed last keeps a caller's temp DOMAIN named text or json from
-- standing in for pg_catalog's (the temporary schema is searched first for types when it is
-- not listed); casts and declared types name pg_catalog anyway (30_control.sql header).
--
-- Conventions of this file:
-- * Public functions keep the original's parameter names (`df.http(url => …, method => …)`
--   is user-facing API); internal helpers (df._*) use p_ names.
-- * NULL handling (docs/api.md "NULL arguments", "all constructors and composers are STRICT"): a NULL operand
--   gives a NULL graph. Functions with optional parameters cannot be declared STRICT (the
--   defaults would be NULL operands too), so they apply the same rule by hand: NULL in a
--   parameter whose default is not NULL gives a NULL graph; NULL in a parameter whose default
--   is NULL means "absent" (no loop condition, null break value, no signal timeout, no body…).
-- * Bad arguments raise SQLSTATE 22023 (invalid_parameter_value) with a message that names
--   the offending value and says what to write instead (pg_durable's texts kept verbatim).
-- * Children are embedded as the text they arrived as (after validation by df._node), so a
--   graph built from DSL calls stays compact JSON without re-serialising subtrees.

------------------------------------------------------------------------------------------
-- internal helpers
------------------------------------------------------------------------------------------

-- The twelve node types of docs/api.md "Tables and views", and pgdurable's RETRY (df.retry).
create function df._node_types() returns text[]
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select array['SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'BREAK', 'SLEEP',
                   'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'RETRY', 'FOREACH'] $$;

-- Assemble one node object in the canonical key order. p_query is the text stored in
-- df.nodes.query (encoded here as a JSON string); the node arguments are graph texts already
-- validated by df._node, embedded verbatim. NULL parts are omitted.
create function df._mk(p_type text, p_query text, p_cond text, p_left text, p_right text,
                       p_extra text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    -- One concat() call, in plpgsql: children are copied once. (Chains of || copy the
    -- growing text per operator; a SQL-language version measured 3x slower on deep graphs.)
    return concat('{"node_type":', to_json(p_type)::pg_catalog.text,
                  ',"query":' || to_json(p_query)::pg_catalog.text,
                  case when p_cond is not null then ',"condition_node":' end, p_cond,
                  case when p_left is not null then ',"left_node":' end, p_left,
                  case when p_right is not null then ',"right_node":' end, p_right,
                  case when p_extra is not null then ',"extra_nodes":[' end, p_extra,
                  case when p_extra is not null then ']' end,
                  '}');
end
$$;

-- Auto-wrap (docs/api.md): turn a node-position argument into a graph value.
--   * a JSON object with a known node_type is a node (returned as is, whitespace trimmed);
--   * a JSON object whose node_type is unknown or not a string raises "Unknown node_type 'X'";
--   * a ?> partial ({"_partial_if":true,…}) raises: it is only valid on the left of !>;
--   * anything else (in practice: SQL text) becomes a SQL node.
-- Helper outputs used as steps: df.setvar/unsetvar/clearvars return 'OK' and
-- df.await_instance returns 'completed'/'failed'/'cancelled' (30_control.sql, 40_inspect.sql).
-- Those functions cannot mark their results, so this is a heuristic on the exact texts: none
-- of them is a valid SQL statement, so rejecting them loses nothing and turns a confusing
-- run-time syntax error (`SELECT df.start(df.setvar('x','1'))`) into a clear build-time one.
create function df._node(p_arg text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_trimmed pg_catalog.text;
    v_json    pg_catalog.json;
    v_type    pg_catalog.json;
    v_name    pg_catalog.text;
begin
    if p_arg in ('OK', 'completed', 'failed', 'cancelled') then
        raise exception using errcode = '22023',
            message = format('the result of df.setvar/df.unsetvar/df.clearvars/df.await_instance '
                             'cannot be used as a workflow step (got %L)', p_arg),
            hint = 'Call the helper in a statement of its own, before or after df.start.';
    end if;
    -- Fast path for the DSL's own output, recognised by its fixed prefix: no parse, so
    -- chaining N steps costs O(N) copies instead of O(N) parses of a growing text (a
    -- 1,000-step chain took 1.2 s with a parse per step). Consequence: a text that starts
    -- like a node but is not valid JSON is taken as a node, and df.start rejects it.
    v_name := substring(left(p_arg, 40) from '^\{"node_type":"([A-Za-z_]+)"[,}]');
    if v_name = any (df._node_types()) then
        return p_arg;
    end if;
    v_trimmed := btrim(p_arg, E' \t\r\n');
    -- SQL text never starts with '{'; only then is it worth trying to parse JSON
    if left(v_trimmed, 1) <> '{' then
        return df._mk('SQL', p_arg, null, null, null, null);
    end if;
    begin
        -- json (not jsonb) only validates the text, and its operators return verbatim
        -- substrings, so subtrees keep their formatting
        v_json := v_trimmed::pg_catalog.json;
    exception
        when data_exception then
            return df._mk('SQL', p_arg, null, null, null, null);
        when program_limit_exceeded then  -- stack depth: JSON nested absurdly deep
            raise exception using errcode = '22023',
                message = 'a node argument is JSON nested too deeply to parse '
                          '(a graph may nest at most 256 levels)';
    end;
    v_type := v_json -> 'node_type';
    if v_type is null then
        if v_json -> '_partial_if' is not null then
            raise exception using errcode = '22023',
                message = 'incomplete IF: "condition ?> then_branch" must be followed by '
                          '"!> else_branch" before it can be used as a node',
                hint = 'All df operators share one precedence level and group left to right: '
                       'write c ?> (a ~> b) !> e, or use df.if(c, then_branch, else_branch).';
        end if;
        return df._mk('SQL', p_arg, null, null, null, null);
    end if;
    if json_typeof(v_type) <> 'string' or not (v_json ->> 'node_type') = any (df._node_types()) then
        raise exception using errcode = '22023',
            message = format('Unknown node_type ''%s''',
                             case json_typeof(v_type) when 'string' then v_json ->> 'node_type'
                                                      else v_type::pg_catalog.text end),
            hint = 'A node_type is one of ' || array_to_string(df._node_types(), ', ')
                   || '; build graph values with the df functions rather than by hand.';
    end if;
    return v_trimmed;
end
$$;

-- Result names and if_rows names: SQL-identifier-like names (docs/api.md "Tables and views" result_name CHECK).
create function df._check_identifier(p_name text, p_what text) returns void
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' then
        raise exception using errcode = '22023',
            message = format('%s %L is not a valid identifier', p_what, p_name),
            hint = 'Use letters, digits and underscores, not starting with a digit '
                   '(e.g. ''order_total''); it is referenced later as $name.';
    end if;
end
$$;

-- One value of a cron field: a number in [p_min, p_max] or, where p_names is given, a name
-- (p_names[1] stands for p_min). Returns the number.
create function df._cron_value(p_expr text, p_field text, p_value text, p_min int, p_max int,
                               p_names text[]) returns int
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_n pg_catalog.int4;
begin
    if p_value ~ '^[0-9]{1,4}$' then
        v_n := p_value::pg_catalog.int4;
    elsif p_names is not null and upper(p_value) = any (p_names) then
        return p_min + array_position(p_names, upper(p_value)) - 1;
    else
        raise exception using errcode = '22023',
            message = format('invalid cron expression %L: %s value %L is not a number%s',
                             p_expr, p_field, p_value,
                             case when p_names is not null
                                  then ' or a name (' || p_names[1] || '-'
                                       || p_names[cardinality(p_names)] || ')' else '' end);
    end if;
    if v_n < p_min or v_n > p_max then
        raise exception using errcode = '22023',
            message = format('invalid cron expression %L: %s value %s is out of range %s-%s',
                             p_expr, p_field, p_value, p_min, p_max);
    end if;
    return v_n;
end
$$;

-- Build-time check of a cron expression (docs/api.md, D7). Only a syntax and range check: the
-- worker computes the ticks with the cronsim library (UTC; pgdurable/cron.py), so this
-- validator accepts a subset of what the worker accepts and stays small. Accepted: the
-- @hourly/@daily/@midnight/@weekly/@monthly/@yearly/@annually macros, or 5 fields (minute
-- 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 or SUN-SAT
-- with 0 and 7 = Sunday), each a comma list of `*`, `n`, `a-b`, optionally followed by `/step`. cronsim's extensions (L, LW,
-- 5L, 5#2) and a seconds or year field are rejected here. A schedule that never fires is
-- rejected too, as the worker's cronsim would (`0 3 31 2 *`: when day-of-month and
-- day-of-week are not both restricted, the smallest day must exist in some chosen month), so
-- the worker never meets one it cannot schedule.
create function df._check_cron(p_expr text) returns void
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    c_fields  constant pg_catalog.text[] := array['minute', 'hour', 'day-of-month', 'month',
                                                  'day-of-week'];
    c_min     constant pg_catalog.int4[] := array[0, 0, 1, 1, 0];
    c_max     constant pg_catalog.int4[] := array[59, 23, 31, 12, 7];
    c_months  constant pg_catalog.text[] := array['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL',
                                                  'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
    c_days    constant pg_catalog.text[] := array['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
    v_expr    pg_catalog.text := btrim(p_expr);
    v_parts   pg_catalog.text[];
    v_names   pg_catalog.text[];
    v_item    pg_catalog.text;
    v_base    pg_catalog.text;
    v_step    pg_catalog.text;
    v_lo      pg_catalog.int4;
    v_hi      pg_catalog.int4;
    -- the longest month (February has 29 days: leap years come within cronsim's horizon)
    c_mdays   constant pg_catalog.int4[] := array[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    v_dom_min pg_catalog.int4 := 31;
    v_mdays   pg_catalog.int4 := 0;
begin
    if left(v_expr, 1) = '@' then
        if lower(v_expr) not in ('@hourly', '@daily', '@midnight', '@weekly', '@monthly',
                                 '@yearly', '@annually') then
            raise exception using errcode = '22023',
                message = format('invalid cron expression %L: unknown macro', p_expr),
                hint = 'Use @hourly, @daily (@midnight), @weekly, @monthly, @yearly (@annually), '
                       'or five fields: minute hour day-of-month month day-of-week.';
        end if;
        return;
    end if;
    v_parts := regexp_split_to_array(v_expr, '\s+');
    if v_expr = '' or cardinality(v_parts) <> 5 then
        raise exception using errcode = '22023',
            message = format('invalid cron expression %L: expected 5 fields, got %s',
                             p_expr, case when v_expr = '' then 0 else cardinality(v_parts) end),
            hint = 'Write minute hour day-of-month month day-of-week, e.g. ''*/15 * * * *'' '
                   '(UTC; no seconds or year field).';
    end if;
    for i in 1..5 loop
        v_names := case i when 4 then c_months when 5 then c_days end;
        foreach v_item in array string_to_array(v_parts[i], ',') loop
            if v_item !~ '^[^/]+(/[^/]*)?$' then
                raise exception using errcode = '22023',
                    message = format('invalid cron expression %L: %s item %L is malformed',
                                     p_expr, c_fields[i], v_item),
                    hint = 'Each comma-separated item is *, n or a-b, optionally with /step.';
            end if;
            v_base := split_part(v_item, '/', 1);
            v_step := nullif(split_part(v_item, '/', 2), '');
            if v_item like '%/%' and (v_step is null or v_step !~ '^[0-9]{1,4}$'
                                      or v_step::pg_catalog.int4 = 0) then
                raise exception using errcode = '22023',
                    message = format('invalid cron expression %L: %s step in %L must be a '
                                     'positive number', p_expr, c_fields[i], v_item);
            end if;
            if v_base = '*' then
                v_lo := c_min[i];
                v_hi := c_max[i];
            elsif v_base ~ '^[^-]+-[^-]+$' then
                v_lo := df._cron_value(p_expr, c_fields[i], split_part(v_base, '-', 1),
                                       c_min[i], c_max[i], v_names);
                v_hi := df._cron_value(p_expr, c_fields[i], split_part(v_base, '-', 2),
                                       c_min[i], c_max[i], v_names);
                if v_lo > v_hi then
                    raise exception using errcode = '22023',
                        message = format('invalid cron expression %L: %s range %L is backwards',
                                         p_expr, c_fields[i], v_base),
                        hint = 'Write ranges low-high; use a list (e.g. 22-23,0-2) to wrap around.';
                end if;
            else
                v_lo := df._cron_value(p_expr, c_fields[i], v_base, c_min[i], c_max[i], v_names);
                -- n/step means n-max/step
                v_hi := case when v_step is null then v_lo else c_max[i] end;
            end if;
            if i = 3 then
                v_dom_min := least(v_dom_min, v_lo);
            elsif i = 4 then
                select greatest(v_mdays, max(c_mdays[m])) into v_mdays
                from generate_series(v_lo, v_hi, coalesce(v_step::pg_catalog.int4, 1)) m;
            end if;
        end loop;
    end loop;
    -- as cronsim: day-of-month and day-of-week must both match when either starts with `*`
    if (left(v_parts[3], 1) = '*' or left(v_parts[5], 1) = '*') and v_dom_min > v_mdays then
        raise exception using errcode = '22023',
            message = format('invalid cron expression %L: it never fires (no month it names has '
                             'a day %s)', p_expr, v_dom_min),
            hint = 'Pick days that exist in the months (February has 29 at most), or restrict '
                   'day-of-week too to fire on either.';
    end if;
end
$$;

-- HTTP argument checks shared by df.http and df.http_multipart (docs/http.md, D12).
-- Returns the method in upper case.
create function df._check_http(p_func text, p_url text, p_method text, p_methods text[],
                               p_headers jsonb, p_timeout int) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    -- pgdurable's cap (docs/decisions.md D12); the service may lower it at run time, SQL cannot raise it
    c_max_timeout constant pg_catalog.int4 := 300;
begin
    -- URLs with {var} placeholders are only known after substitution: checked at run time
    if strpos(p_url, '{') = 0 and p_url !~* '^https?://' then
        raise exception using errcode = '22023',
            message = format('%s: unsupported URL scheme in %L', p_func, p_url),
            hint = 'Use an absolute http:// or https:// URL.';
    end if;
    if not upper(p_method) = any (p_methods) then
        raise exception using errcode = '22023',
            message = format('%s: unsupported HTTP method %L', p_func, p_method),
            hint = 'Use one of ' || array_to_string(p_methods, ', ') || ' (any case).';
    end if;
    if p_headers is not null and jsonb_typeof(p_headers) <> 'object' then
        raise exception using errcode = '22023',
            message = format('%s: headers must be a JSON object, got %s %s',
                             p_func, jsonb_typeof(p_headers), left(p_headers::pg_catalog.text, 100)),
            hint = 'Pass headers as an object of strings, e.g. ''{"Accept": "application/json"}''.';
    end if;
    if p_timeout <= 0 or p_timeout > c_max_timeout then
        raise exception using errcode = '22023',
            message = format('%s: timeout_seconds must be between 1 and %s, got %s '
                             '(pgdurable caps HTTP timeouts at %s seconds)',
                             p_func, c_max_timeout, p_timeout, c_max_timeout),
            hint = 'Pick a timeout in seconds within the cap.';
    end if;
    return upper(p_method);
end
$$;

------------------------------------------------------------------------------------------
-- leaves
------------------------------------------------------------------------------------------

-- A SQL step. Explicit, so no JSON detection; the helper-output check still applies.
create function df.sql(query text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    if query in ('OK', 'completed', 'failed', 'cancelled') then
        return df._node(query);  -- raises the "cannot be used as a workflow step" error
    end if;
    return df._mk('SQL', query, null, null, null, null);
end
$$;

-- Exit the nearest enclosing loop with a value (a literal: JSON if it parses, else a string,
-- decided by the worker). NULL (the default) is a null break value.
create function df."break"(value text default null) returns text
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select df._mk('BREAK', '{"break_value":' || coalesce(to_json(value)::pg_catalog.text, 'null') || '}',
                  null, null, null, null)
$$;

-- A durable timer of `seconds` (0 allowed: yields once), at most 10,000,000,000 (~317 years):
-- its due time must stay inside PostgreSQL's interval and timestamp ranges, or the
-- checkpoint that schedules it fails every time (the worker refuses a stored graph with more,
-- pgdurable/worker/instance.py SLEEP_MAX_SECONDS).
create function df.sleep(seconds bigint) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    if seconds < 0 then
        raise exception using errcode = '22023',
            message = format('df.sleep: seconds must be >= 0, got %s', seconds),
            hint = 'Pass a number of seconds, e.g. df.sleep(30); 0 sleeps not at all.';
    end if;
    if seconds > 10000000000 then
        raise exception using errcode = '22023',
            message = format('df.sleep: seconds must be at most 10000000000 (about 317 years), got %s',
                             seconds),
            hint = 'To wait for an event rather than a time, use df.wait_for_signal without a timeout.';
    end if;
    return df._mk('SLEEP', seconds::pg_catalog.text, null, null, null, null);
end
$$;

-- Wait for the next tick of a cron schedule (UTC, computed when the node runs).
create function df.wait_for_schedule(cron_expr text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    perform df._check_cron(cron_expr);
    return df._mk('WAIT_SCHEDULE', '{"cron_expr":' || to_json(cron_expr)::pg_catalog.text || '}',
                  null, null, null, null);
end
$$;

-- Wait for df.signal(instance, name, data); timeout_seconds NULL (the default) waits forever.
create function df.wait_for_signal(name text, timeout_seconds int default null) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    if name is null then
        return null;
    end if;
    if name = '' then
        raise exception using errcode = '22023',
            message = 'df.wait_for_signal: the signal name must not be empty',
            hint = 'Name the signal, e.g. df.wait_for_signal(''approved''), and send it with '
                   'df.signal(instance_id, ''approved'').';
    end if;
    if timeout_seconds <= 0 then
        raise exception using errcode = '22023',
            message = format('df.wait_for_signal: timeout_seconds must be > 0, got %s',
                             timeout_seconds),
            hint = 'Pass a positive number of seconds, or NULL to wait without a timeout.';
    end if;
    return df._mk('SIGNAL', '{"signal_name":' || to_json(name)::pg_catalog.text || ',"timeout_seconds":'
                            || coalesce(timeout_seconds::pg_catalog.text, 'null') || '}',
                  null, null, null, null);
end
$$;

-- An HTTP request (docs/http.md). The allow-list/deny policy is the service's (D12), applied
-- when the node runs; here only the arguments are checked.
create function df.http(url text, method text default 'POST', body text default null,
                        headers jsonb default null, timeout_seconds int default 30)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_method pg_catalog.text;
begin
    if url is null or method is null or timeout_seconds is null then
        return null;
    end if;
    v_method := df._check_http('df.http', url, method,
                               array['GET', 'POST', 'PUT', 'DELETE', 'PATCH'],
                               headers, timeout_seconds);
    return df._mk('HTTP',
                  '{"url":' || to_json(url)::pg_catalog.text
                  || ',"method":' || to_json(v_method)::pg_catalog.text
                  || ',"body":' || coalesce(to_json(body)::pg_catalog.text, 'null')
                  || ',"headers":' || coalesce(headers::pg_catalog.text, 'null')
                  || ',"timeout_seconds":' || timeout_seconds::pg_catalog.text || '}',
                  null, null, null, null);
end
$$;

-- A multipart/form-data request: parts = [{"name", "data_b64", "filename"?, "content_type"?}]
-- (the fields of each part are checked when the node runs, docs/http.md).
create function df.http_multipart(url text, method text default 'POST', parts jsonb default null,
                                  headers jsonb default null, timeout_seconds int default 30)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_method pg_catalog.text;
begin
    if url is null or method is null or timeout_seconds is null then
        return null;
    end if;
    v_method := df._check_http('df.http_multipart', url, method, array['POST', 'PUT', 'PATCH'],
                               headers, timeout_seconds);
    if parts is null or jsonb_typeof(parts) <> 'array' or jsonb_array_length(parts) = 0 then
        raise exception using errcode = '22023',
            message = format('df.http_multipart: parts must be a non-empty JSON array, got %s',
                             coalesce(left(parts::pg_catalog.text, 100), 'NULL')),
            hint = 'Pass parts => ''[{"name": "file", "data_b64": "aGk=", '
                   '"filename": "hi.txt"}]''.';
    end if;
    return df._mk('HTTP_MULTIPART',
                  '{"url":' || to_json(url)::pg_catalog.text
                  || ',"method":' || to_json(v_method)::pg_catalog.text
                  || ',"parts":' || parts::pg_catalog.text
                  || ',"headers":' || coalesce(headers::pg_catalog.text, 'null')
                  || ',"timeout_seconds":' || timeout_seconds::pg_catalog.text || '}',
                  null, null, null, null);
end
$$;

------------------------------------------------------------------------------------------
-- composers (node arguments are auto-wrapped by df._node)
------------------------------------------------------------------------------------------

-- a, then b (b sees a's named results). Operator ~>.
create function df.seq(a text, b text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df._mk('THEN', null, null, df._node(a), df._node(b), null) $$;

-- Both branches concurrently; the result is the array of their results. Operator &.
create function df."join"(a text, b text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df._mk('JOIN', null, null, df._node(a), df._node(b), null) $$;

-- Three branches concurrently (the third rides in extra_nodes).
create function df.join3(a text, b text, c text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df._mk('JOIN', null, null, df._node(a), df._node(b), df._node(c)) $$;

-- Both branches concurrently; the first to finish (success or failure) wins. Operator |.
create function df.race(a text, b text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df._mk('RACE', null, null, df._node(a), df._node(b), null) $$;

-- Run condition (any node), then then_branch if its result is truthy (docs/api.md "Conditions"), else
-- else_branch.
create function df."if"(condition text, then_branch text, else_branch text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select df._mk('IF', null, df._node(condition), df._node(then_branch), df._node(else_branch),
                  null)
$$;

-- then_branch if the named SQL result has rows, else else_branch; runs no SQL itself.
create function df.if_rows(result_name text, then_branch text, else_branch text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    perform df._check_identifier(result_name, 'result name');
    return df._mk('IF', '{"condition_type":"result_has_rows","result_name":'
                        || to_json(result_name)::pg_catalog.text || '}',
                  null, df._node(then_branch), df._node(else_branch), null);
end
$$;

-- Repeat body until a df.break (condition NULL, the default: an infinite loop, like @>) or
-- while condition is truthy after each iteration (do-while).
create function df.loop(body text, condition text default null) returns text
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select case when body is not null
                then df._mk('LOOP', null, df._node(condition), df._node(body), null, null) end
$$;

-- A RETRY node's config (the text stored in its query), after checking every argument: 22023
-- naming the argument when one is NULL or out of range. Shared by df.retry and df.start's
-- validation of a hand-written RETRY (30_control.sql). Delays are seconds, at most
-- 10,000,000,000 like df.sleep (a due time must stay inside PostgreSQL's ranges).
create function df._retry_config(p_max_attempts int, p_initial_delay float8, p_backoff float8,
                                 p_max_delay float8) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_arg pg_catalog.text;
    v_val pg_catalog.float8;
begin
    if p_max_attempts is null then
        raise exception using errcode = '22023',
            message = 'df.retry: max_attempts must not be NULL',
            hint = 'Pass a whole number of attempts of at least 1 (the first run counts), '
                   'or leave it out for 3.';
    end if;
    if p_max_attempts < 1 then
        raise exception using errcode = '22023',
            message = format('df.retry: max_attempts must be at least 1, got %s', p_max_attempts),
            hint = 'max_attempts counts every run, the first included: 1 runs the step once, '
                   'without retrying.';
    end if;
    foreach v_arg in array array['initial_delay_seconds', 'backoff', 'max_delay_seconds'] loop
        v_val := case v_arg when 'initial_delay_seconds' then p_initial_delay
                            when 'backoff' then p_backoff else p_max_delay end;
        if v_val is null then
            raise exception using errcode = '22023',
                message = format('df.retry: %s must not be NULL', v_arg),
                hint = 'Leave the argument out for its default (initial_delay_seconds 1, '
                       'backoff 2, max_delay_seconds 60).';
        end if;
        if v_val in ('NaN'::pg_catalog.float8, 'Infinity'::pg_catalog.float8,
                     '-Infinity'::pg_catalog.float8) then
            raise exception using errcode = '22023',
                message = format('df.retry: %s must be a finite number, got %s', v_arg, v_val);
        end if;
        if v_arg = 'backoff' and v_val < 1 then
            raise exception using errcode = '22023',
                message = format('df.retry: backoff must be at least 1, got %s', v_val),
                hint = 'backoff multiplies the delay after each failed attempt: 1 keeps it '
                       'constant, 2 doubles it.';
        end if;
        if v_arg <> 'backoff' and v_val < 0 then
            raise exception using errcode = '22023',
                message = format('df.retry: %s must be >= 0, got %s', v_arg, v_val),
                hint = 'Delays are seconds; 0 retries at once.';
        end if;
        if v_val > 10000000000 then
            raise exception using errcode = '22023',
                message = format('df.retry: %s must be at most 10000000000, got %s', v_arg, v_val);
        end if;
    end loop;
    return '{"max_attempts":' || p_max_attempts::pg_catalog.text
        || ',"initial_delay_seconds":' || to_json(p_initial_delay)::pg_catalog.text
        || ',"backoff":' || to_json(p_backoff)::pg_catalog.text
        || ',"max_delay_seconds":' || to_json(p_max_delay)::pg_catalog.text || '}';
end
$$;

-- Run step (any graph value: a leaf or a subgraph) again when it fails: its nodes are reset
-- and it runs after a delay of initial_delay_seconds * backoff^(attempt - 1), at most
-- max_delay_seconds (the worker spreads it by up to 20% less: jitter), until max_attempts
-- runs have failed; then the failure propagates as without df.retry (docs/retry.md). A NULL
-- step gives a NULL graph like every composer; a NULL option is an error naming it (NULL
-- cannot mean "the default" here, and a silently NULL graph would hide the mistake).
create function df.retry(step text, max_attempts integer default 3,
                         initial_delay_seconds double precision default 1,
                         backoff double precision default 2,
                         max_delay_seconds double precision default 60) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_cfg pg_catalog.text;
begin
    v_cfg := df._retry_config(max_attempts, initial_delay_seconds, backoff, max_delay_seconds);
    if step is null then
        return null;
    end if;
    return df._mk('RETRY', v_cfg, null, df._node(step), null, null);
end
$$;

-- Name a node's result (referenced later as $name). Operator |=>. Renaming replaces the
-- previous name.
create function df."as"(fut text, name text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_node pg_catalog.text;
    v_head pg_catalog.text[];
begin
    perform df._check_identifier(name, 'result name');
    v_node := df._node(fut);
    -- Fast path for the DSL's own output (df._mk key order): splice the name in after
    -- node_type/query without parsing the subtrees, so naming each step of a growing chain
    -- stays linear (a 1,000-step named chain took 1 s with a parse per step). The regex
    -- sees only a prefix: PostgreSQL converts a regex's whole input to wide chars first.
    -- (?!,"query") makes a query cut off by the prefix fall through to the general path.
    v_head := regexp_match(left(v_node, 4096),
                           '^(\{"node_type":"[A-Z_]+"(?:,"query":"(?:[^"\\]|\\.)*")?)'
                           '(,"result_name":"[A-Za-z0-9_]*")?(?!,"query")[,}]');
    if v_head is not null then
        -- right(t, -n) skips n characters without counting the rest (substr would)
        return v_head[1] || ',"result_name":' || to_json(name)::pg_catalog.text
            || right(v_node, -(length(v_head[1]) + coalesce(length(v_head[2]), 0)));
    end if;
    -- Anything else (hand-written JSON): re-emit the top level in canonical key order from
    -- json_each, whose values are verbatim substrings, so the subtrees keep their text.
    return (
        select '{' || string_agg(to_json(k)::pg_catalog.text || ':' || v, ',' order by ord, n) || '}'
        from (select e.key as k, e.value::pg_catalog.text as v, e.n,
                     case e.key when 'node_type' then 1 when 'query' then 2 else 4 end as ord
              from json_each(v_node::pg_catalog.json) with ordinality as e(key, value, n)
              where e.key <> 'result_name'
              union all
              select 'result_name', to_json(name)::pg_catalog.text, 0, 3) as parts);
end
$$;

------------------------------------------------------------------------------------------
-- operator functions (20_operators.sql); plain functions, callable directly too
------------------------------------------------------------------------------------------

-- `f |=> 'name'` = df.as(f, 'name').
create function df.as_op(fut text, name text) returns text
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df."as"(fut, name) $$;

-- `@> body` = df.loop(body): a prefix operator needs a one-argument function.
create function df.loop_op(body text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df.loop(body) $$;

-- pg_durable's name for the same helper (its @> calls it); kept callable under that name.
create function df.loop_prefix_op(body text) returns text
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select df.loop(body) $$;

-- `c ?> t`: the first half of an IF, a partial object only !> accepts (ARCHITECTURE.md §1).
create function df.if_then_op(condition text, then_branch text) returns text
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select '{"_partial_if":true,"condition":' || df._node(condition)
        || ',"then_branch":' || df._node(then_branch) || '}'
$$;

-- `p !> e`: completes a ?> partial into df.if(condition, then_branch, else_branch).
create function df.if_else_op(partial text, else_branch text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_json pg_catalog.json;
begin
    if partial is null or else_branch is null then
        return null;  -- as df.if (strict) would give
    end if;
    begin
        v_json := btrim(partial, E' \t\r\n')::pg_catalog.json;
    exception when data_exception or program_limit_exceeded then
        v_json := null;
    end;
    if v_json is null or json_typeof(v_json) <> 'object'
            or (v_json ->> '_partial_if') is distinct from 'true' then
        raise exception using errcode = '22023',
            message = format('!> needs "condition ?> then_branch" on its left, got %s',
                             case when json_typeof(v_json) = 'object'
                                       and v_json ->> 'node_type' is not null
                                  then 'a ' || (v_json ->> 'node_type') || ' node'
                                  else format('SQL text %L', left(partial, 60)) end),
            hint = 'All df operators share one precedence level and group left to right: '
                   'write c ?> (a ~> b) !> e, or use df.if(c, then_branch, else_branch).';
    end if;
    return df."if"((v_json -> 'condition')::pg_catalog.text,
                   (v_json -> 'then_branch')::pg_catalog.text, else_branch);
end
$$;
