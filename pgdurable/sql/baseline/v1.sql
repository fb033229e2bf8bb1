-- pgdurable schema, part 00: tables, indexes, RLS and small shared helpers.
--
-- Map of the whole schema (files in pgdurable/sql/schema/ are applied in name order):
--   00_tables.sql   df.instances, df.nodes, df.vars, df._worker_epoch (the pg_durable contract,
--                   SPEC §2) and the engine schema @engine@ (runnable work + leases, scheduler
--                   state, signal inbox, workers, readiness, migrations); RLS; settings/clock helpers
--   10_dsl.sql      the DSL: df.sql/seq/as/join/join3/race/if/if_rows/loop/break/sleep/
--                   wait_for_schedule/wait_for_signal/http/http_multipart + auto-wrap + validation
--   20_operators.sql the seven operators ~> |=> & | ?> !> @> (schema chosen at install)
--   30_control.sql  df.start/signal/cancel/status/result/error/await_instance and the engine
--                   helpers they call (SECURITY DEFINER, fixed search_path)
--   40_inspect.sql  df.list_instances/instance_nodes/instance_info/instance_executions/explain/
--                   metrics, vars functions, grant_usage/revoke_usage, misc (version, run, ...)
--   90_grants.sql   privileges: no PUBLIC access except EXECUTE on ordinary df functions
--
-- Placeholders substituted by pgdurable/schema.py at install time:
--   @engine@   the engine schema (default pgdurable)        @version@ the package version
--   @opschema@ the schema that receives the operators (pg_catalog when superuser, else public)
--
-- Conventions: lower-case keywords; p_ parameters, v_ locals; identifiers composed only with
-- format('%I'); every engine function a worker calls carries a _v1 suffix (STYLE B4).

create schema if not exists df;
create schema if not exists @engine@;
-- the per-role step runners (see worker/identity notes in docs/security.md) live in a schema
-- nobody but the service can even name: a tenant owns its runner but cannot ALTER it.
create schema if not exists @engine@_exec;

------------------------------------------------------------------------------------------
-- df: the user-facing contract tables (SPEC §2)
------------------------------------------------------------------------------------------

create table df.instances (
    id           varchar(8)  not null primary key,
    label        text,
    root_node    varchar(8)  not null,
    status       text        not null default 'pending',
    submitted_by regrole     not null,
    database     text,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    completed_at timestamptz,
    constraint instances_id_format check (id ~ '^[0-9a-f]{8}$') not valid,
    constraint instances_status_check
        check (status in ('pending', 'running', 'completed', 'failed', 'cancelled')) not valid,
    constraint instances_id_submitted_by_key unique (id, submitted_by)
);
create index instances_status_created_idx on df.instances (status, created_at desc, id);
create index instances_created_idx on df.instances (created_at desc, id);
create index instances_label_idx on df.instances (label, created_at desc, id) where label is not null;

create table df.nodes (
    id             varchar(8)  not null,
    instance_id    varchar(8)  not null,
    node_type      text        not null,
    query          text,
    result_name    text,
    left_node      varchar(8),
    right_node     varchar(8),
    status         text        not null default 'pending',
    result         jsonb,
    error          text,
    submitted_by   regrole     not null,
    database       text,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    status_details jsonb,
    primary key (instance_id, id),
    constraint nodes_status_check
        check (status in ('pending', 'running', 'completed', 'failed')) not valid,
    constraint nodes_type_check check (node_type in ('SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE',
        'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART')) not valid,
    constraint nodes_result_name_check
        check (result_name is null or result_name ~ '^[A-Za-z_][A-Za-z0-9_]*$') not valid,
    -- structure per node type (SPEC §2)
    constraint nodes_structure_check check (
        case
            when node_type in ('SQL', 'SLEEP', 'WAIT_SCHEDULE', 'BREAK', 'HTTP', 'HTTP_MULTIPART',
                               'SIGNAL')
                then query is not null and left_node is null and right_node is null
            when node_type in ('THEN', 'RACE')
                then query is null and left_node is not null and right_node is not null
            when node_type = 'IF'
                then query is not null and left_node is not null and right_node is not null
            when node_type = 'LOOP' then left_node is not null and right_node is null
            when node_type = 'JOIN' then left_node is not null and right_node is not null
            else false
        end) not valid,
    constraint nodes_instance_fk foreign key (instance_id, submitted_by)
        references df.instances (id, submitted_by) on delete cascade deferrable initially deferred,
    constraint nodes_left_fk foreign key (instance_id, left_node)
        references df.nodes (instance_id, id) deferrable initially deferred,
    constraint nodes_right_fk foreign key (instance_id, right_node)
        references df.nodes (instance_id, id) deferrable initially deferred
);

alter table df.instances add constraint instances_root_fk foreign key (id, root_node)
    references df.nodes (instance_id, id) deferrable initially deferred;

create table df.vars (
    name  text    not null,
    value text,
    owner regrole not null default current_user::regrole,
    primary key (owner, name)
);

create table df._worker_epoch (
    epoch_id     uuid        not null primary key,
    started_at   timestamptz not null default now(),
    last_seen_at timestamptz not null default now()
);

alter table df.instances enable row level security;
alter table df.nodes enable row level security;
alter table df.vars enable row level security;
create policy instances_owner on df.instances for all
    using (submitted_by = quote_ident(current_user)::regrole)
    with check (submitted_by = quote_ident(current_user)::regrole);
create policy nodes_owner on df.nodes for all
    using (submitted_by = quote_ident(current_user)::regrole)
    with check (submitted_by = quote_ident(current_user)::regrole);
create policy vars_owner on df.vars for all
    using (owner = quote_ident(current_user)::regrole)
    with check (owner = quote_ident(current_user)::regrole);

------------------------------------------------------------------------------------------
-- engine schema: private to the service (STYLE B4: layout may change through migrations)
------------------------------------------------------------------------------------------

-- Readiness (docs/decisions.md D2/D3): df.start refuses to write while schema_version < 1.
create table @engine@._worker_ready (
    sentinel       boolean     not null primary key default true check (sentinel),
    schema_version integer     not null default 0,
    initialized_at timestamptz not null default now()
);

-- One row per applied schema version (the installed version is the max).
create table @engine@.migrations (
    version    integer     not null primary key,
    package    text        not null,
    applied_at timestamptz not null default now()
);

-- Per-instance engine data: the frozen vars snapshot (SPEC §3.3), the scheduler state blob
-- (graph/_abc.py: SchedulerProto.dump_state) and a version bumped by every checkpoint so a
-- worker's cached state can be validated with one integer compare.
create table @engine@.runs (
    instance_id   varchar(8)  not null primary key,
    vars          jsonb       not null default '{}',
    state         bytea,
    state_version bigint      not null default 0,
    cancel_reason text,
    created_at    timestamptz not null default now()
);

-- Named results as the instance's steps see them (SPEC §3.3, D9): the latest value of each
-- name, kept here because a loop re-activation clears the node row's result while the value
-- must carry over into the next iteration; a worker reloading an instance reads this map.
create table @engine@.results (
    instance_id varchar(8) not null,
    name        text       not null,
    value       jsonb,
    seq         bigint     not null,
    primary key (instance_id, name)
);

-- Runnable work: one row per node activation a worker must act on.
--   kind 'start'  the instance has not been loaded by a worker yet (written by df.start)
--        'run'    a leaf to execute now (SQL, HTTP, BREAK, if_rows check)
--        'timer'  SLEEP / WAIT_SCHEDULE firing at due_at
--        'signal' a SIGNAL wait: due_at = timeout (or infinity); df.signal sets due_at = now()
-- A row is claimable when due_at <= now() and lease_owner is null; the maintenance rescuer
-- clears expired leases. The row is deleted in the transaction that checkpoints its outcome.
create table @engine@.tasks (
    instance_id      varchar(8)  not null,
    node_id          varchar(8)  not null,
    gen              integer     not null default 1,
    kind             text        not null default 'run'
        check (kind in ('start', 'run', 'timer', 'signal')),
    due_at           timestamptz not null default now(),
    -- SIGNAL waits: when the wait times out (NULL = never); the task is parked at this time
    deadline         timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    attempts         integer     not null default 0,
    submitted_by     regrole     not null,
    database         text,
    created_at       timestamptz not null default now(),
    primary key (instance_id, node_id)
);
-- The claim reads only unleased rows in due order; the rescuer only leased rows by expiry.
create index tasks_ready_idx on @engine@.tasks (due_at) where lease_owner is null;
create index tasks_leased_idx on @engine@.tasks (lease_expires_at) where lease_owner is not null;

-- Durable signal inbox (docs/decisions.md D6): kept until a matching wait consumes it, FIFO per name.
create table @engine@.signals (
    id          bigint generated always as identity primary key,
    instance_id varchar(8)  not null,
    name        text        not null,
    data        jsonb       not null default '{}',
    created_at  timestamptz not null default now()
);
create index signals_instance_name_idx on @engine@.signals (instance_id, name, id);

-- Which role a step transaction runs for (docs/decisions.md D5). The worker writes its row inside the
-- step's own transaction, keyed by backend pid and stamped with that transaction's id, so
-- @engine@._invoker() inside an engine helper called from a step identifies the step's role
-- (session_user there is the service's). Unforgeable: tenants cannot write this table, and a
-- stale row never matches another transaction's id.
create table @engine@.step_sessions (
    pid  integer not null primary key,
    xid  bigint  not null,
    role oid     not null
);

-- Live processes of every `serve` (supervisors and workers); df.workers is a view over it.
create table @engine@.workers (
    worker_id    text        not null primary key,
    kind         text        not null check (kind in ('supervisor', 'worker')),
    host         text        not null,
    pid          integer     not null,
    version      text        not null,
    started_at   timestamptz not null default now(),
    last_seen_at timestamptz not null default now(),
    in_flight    integer     not null default 0
);

------------------------------------------------------------------------------------------
-- shared helpers
------------------------------------------------------------------------------------------

-- pg_durable.* settings are plain custom GUCs read at call time with a default, so
-- ALTER DATABASE/ALTER SYSTEM/SET work without an extension (SPEC §1).
create function @engine@.setting(p_name text, p_default text) returns text
language sql stable parallel safe
set search_path = pg_catalog
as $$ select coalesce(nullif(current_setting('pg_durable.' || p_name, true), ''), p_default) $$;

-- The clock every df function and engine query uses for due times. Tests control it
-- (STYLE B16): pg_durable.fake_now pins it (SQL tests), pg_durable.clock_offset shifts a
-- running clock (acceptance tests of cron schedules: ALTER DATABASE … SET before serve
-- starts). Production sets neither.
create function @engine@.clock() returns timestamptz
language sql stable parallel safe
set search_path = pg_catalog
as $$ select coalesce(nullif(current_setting('pg_durable.fake_now', true), '')::timestamptz,
                      now())
             + coalesce(nullif(current_setting('pg_durable.clock_offset', true), '')::interval,
                        interval '0') $$;

-- True inside a workflow step session (the worker sets df.in_workflow = 'true').
create function @engine@.in_workflow() returns boolean
language sql stable parallel safe
set search_path = pg_catalog
as $$ select coalesce(current_setting('df.in_workflow', true), '') = 'true' $$;
-- pgdurable schema, part 10: the DSL (SPEC §3, ARCHITECTURE §1).
--
-- Every function here builds a graph value: text holding one compact JSON object
-- {"node_type", "query"?, "result_name"?, "condition_node"?, "left_node"?, "right_node"?,
-- "extra_nodes"?} with keys in that order. Nothing is stored: df.start flattens and
-- validates the whole value later. The functions are pure (IMMUTABLE, no table access) and
-- run with search_path = pg_catalog, so they behave the same under any caller search_path.
--
-- Conventions of this file:
-- * Public functions keep the original's parameter names (`df.http(url => …, method => …)`
--   is user-facing API); internal helpers (df._*) use p_ names.
-- * NULL handling (SPEC §9, "all constructors and composers are STRICT"): a NULL operand
--   gives a NULL graph. Functions with optional parameters cannot be declared STRICT (the
--   defaults would be NULL operands too), so they apply the same rule by hand: NULL in a
--   parameter whose default is not NULL gives a NULL graph; NULL in a parameter whose default
--   is NULL means "absent" (no loop condition, null break value, no signal timeout, no body…).
-- * Bad arguments raise SQLSTATE 22023 (invalid_parameter_value) with a message that names
--   the offending value and says what to write instead (SPEC §8 texts kept verbatim).
-- * Children are embedded as the text they arrived as (after validation by df._node), so a
--   graph built from DSL calls stays compact JSON without re-serialising subtrees.

------------------------------------------------------------------------------------------
-- internal helpers
------------------------------------------------------------------------------------------

-- The twelve node types of SPEC §2.
create function df._node_types() returns text[]
language sql immutable parallel safe
set search_path = pg_catalog
as $$ select array['SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'BREAK', 'SLEEP',
                   'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART'] $$;

-- Assemble one node object in the canonical key order. p_query is the text stored in
-- df.nodes.query (encoded here as a JSON string); the node arguments are graph texts already
-- validated by df._node, embedded verbatim. NULL parts are omitted.
create function df._mk(p_type text, p_query text, p_cond text, p_left text, p_right text,
                       p_extra text) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog
as $$
begin
    -- One concat() call, in plpgsql: children are copied once. (Chains of || copy the
    -- growing text per operator; a SQL-language version measured 3x slower on deep graphs.)
    return concat('{"node_type":', to_json(p_type)::text,
                  ',"query":' || to_json(p_query)::text,
                  case when p_cond is not null then ',"condition_node":' end, p_cond,
                  case when p_left is not null then ',"left_node":' end, p_left,
                  case when p_right is not null then ',"right_node":' end, p_right,
                  case when p_extra is not null then ',"extra_nodes":[' end, p_extra,
                  case when p_extra is not null then ']' end,
                  '}');
end
$$;

-- Auto-wrap (SPEC §3): turn a node-position argument into a graph value.
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
set search_path = pg_catalog
as $$
declare
    v_trimmed text;
    v_json    json;
    v_type    json;
    v_name    text;
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
        v_json := v_trimmed::json;
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
                                                      else v_type::text end),
            hint = 'A node_type is one of ' || array_to_string(df._node_types(), ', ')
                   || '; build graph values with the df functions rather than by hand.';
    end if;
    return v_trimmed;
end
$$;

-- Result names and if_rows names: SQL-identifier-like names (SPEC §2 result_name CHECK).
create function df._check_identifier(p_name text, p_what text) returns void
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
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
set search_path = pg_catalog
as $$
declare
    v_n int;
begin
    if p_value ~ '^[0-9]{1,4}$' then
        v_n := p_value::int;
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

-- Build-time check of a cron expression (SPEC §3, D7). Only a syntax and range check: the
-- worker computes the ticks with the cronsim library (UTC; pgdurable/cron.py), so this
-- validator accepts a subset of what the worker accepts and stays small. Accepted: the
-- @hourly/@daily/@midnight/@weekly/@monthly/@yearly/@annually macros, or 5 fields (minute
-- 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 or SUN-SAT
-- with 0 and 7 = Sunday), each a comma list of `*`, `n`, `a-b`, optionally followed by `/step`. cronsim's extensions (L, LW,
-- 5L, 5#2) and a seconds or year field are rejected here. Calendar-impossible dates
-- (`0 0 30 2 *`) pass this check and fail when the node runs.
create function df._check_cron(p_expr text) returns void
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
as $$
declare
    c_fields  constant text[] := array['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    c_min     constant int[] := array[0, 0, 1, 1, 0];
    c_max     constant int[] := array[59, 23, 31, 12, 7];
    c_months  constant text[] := array['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG',
                                       'SEP', 'OCT', 'NOV', 'DEC'];
    c_days    constant text[] := array['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
    v_expr    text := btrim(p_expr);
    v_parts   text[];
    v_names   text[];
    v_item    text;
    v_base    text;
    v_step    text;
    v_lo      int;
    v_hi      int;
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
                                      or v_step::int = 0) then
                raise exception using errcode = '22023',
                    message = format('invalid cron expression %L: %s step in %L must be a '
                                     'positive number', p_expr, c_fields[i], v_item);
            end if;
            if v_base = '*' then
                continue;
            end if;
            if v_base ~ '^[^-]+-[^-]+$' then
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
                perform df._cron_value(p_expr, c_fields[i], v_base, c_min[i], c_max[i], v_names);
            end if;
        end loop;
    end loop;
end
$$;

-- HTTP argument checks shared by df.http and df.http_multipart (SPEC §3.8, D12).
-- Returns the method in upper case.
create function df._check_http(p_func text, p_url text, p_method text, p_methods text[],
                               p_headers jsonb, p_timeout int) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog
as $$
declare
    -- pgdurable's cap (docs/decisions.md D12); the service may lower it at run time, SQL cannot raise it
    c_max_timeout constant int := 300;
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
                             p_func, jsonb_typeof(p_headers), left(p_headers::text, 100)),
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
set search_path = pg_catalog
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
set search_path = pg_catalog
as $$
    select df._mk('BREAK', '{"break_value":' || coalesce(to_json(value)::text, 'null') || '}',
                  null, null, null, null)
$$;

-- A durable timer of `seconds` (0 allowed: yields once).
create function df.sleep(seconds bigint) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
as $$
begin
    if seconds < 0 then
        raise exception using errcode = '22023',
            message = format('df.sleep: seconds must be >= 0, got %s', seconds),
            hint = 'Pass a number of seconds, e.g. df.sleep(30); 0 sleeps not at all.';
    end if;
    return df._mk('SLEEP', seconds::text, null, null, null, null);
end
$$;

-- Wait for the next tick of a cron schedule (UTC, computed when the node runs).
create function df.wait_for_schedule(cron_expr text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
as $$
begin
    perform df._check_cron(cron_expr);
    return df._mk('WAIT_SCHEDULE', '{"cron_expr":' || to_json(cron_expr)::text || '}',
                  null, null, null, null);
end
$$;

-- Wait for df.signal(instance, name, data); timeout_seconds NULL (the default) waits forever.
create function df.wait_for_signal(name text, timeout_seconds int default null) returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog
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
    return df._mk('SIGNAL', '{"signal_name":' || to_json(name)::text || ',"timeout_seconds":'
                            || coalesce(timeout_seconds::text, 'null') || '}',
                  null, null, null, null);
end
$$;

-- An HTTP request (SPEC §3.8). The allow-list/deny policy is the service's (D12), applied
-- when the node runs; here only the arguments are checked.
create function df.http(url text, method text default 'POST', body text default null,
                        headers jsonb default null, timeout_seconds int default 30)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog
as $$
declare
    v_method text;
begin
    if url is null or method is null or timeout_seconds is null then
        return null;
    end if;
    v_method := df._check_http('df.http', url, method,
                               array['GET', 'POST', 'PUT', 'DELETE', 'PATCH'],
                               headers, timeout_seconds);
    return df._mk('HTTP',
                  '{"url":' || to_json(url)::text
                  || ',"method":' || to_json(v_method)::text
                  || ',"body":' || coalesce(to_json(body)::text, 'null')
                  || ',"headers":' || coalesce(headers::text, 'null')
                  || ',"timeout_seconds":' || timeout_seconds::text || '}',
                  null, null, null, null);
end
$$;

-- A multipart/form-data request: parts = [{"name", "data_b64", "filename"?, "content_type"?}]
-- (the fields of each part are checked when the node runs, SPEC §3.8).
create function df.http_multipart(url text, method text default 'POST', parts jsonb default null,
                                  headers jsonb default null, timeout_seconds int default 30)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog
as $$
declare
    v_method text;
begin
    if url is null or method is null or timeout_seconds is null then
        return null;
    end if;
    v_method := df._check_http('df.http_multipart', url, method, array['POST', 'PUT', 'PATCH'],
                               headers, timeout_seconds);
    if parts is null or jsonb_typeof(parts) <> 'array' or jsonb_array_length(parts) = 0 then
        raise exception using errcode = '22023',
            message = format('df.http_multipart: parts must be a non-empty JSON array, got %s',
                             coalesce(left(parts::text, 100), 'NULL')),
            hint = 'Pass parts => ''[{"name": "file", "data_b64": "aGk=", '
                   '"filename": "hi.txt"}]''.';
    end if;
    return df._mk('HTTP_MULTIPART',
                  '{"url":' || to_json(url)::text
                  || ',"method":' || to_json(v_method)::text
                  || ',"parts":' || parts::text
                  || ',"headers":' || coalesce(headers::text, 'null')
                  || ',"timeout_seconds":' || timeout_seconds::text || '}',
                  null, null, null, null);
end
$$;

------------------------------------------------------------------------------------------
-- composers (node arguments are auto-wrapped by df._node)
------------------------------------------------------------------------------------------

-- a, then b (b sees a's named results). Operator ~>.
create function df.seq(a text, b text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$ select df._mk('THEN', null, null, df._node(a), df._node(b), null) $$;

-- Both branches concurrently; the result is the array of their results. Operator &.
create function df."join"(a text, b text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$ select df._mk('JOIN', null, null, df._node(a), df._node(b), null) $$;

-- Three branches concurrently (the third rides in extra_nodes).
create function df.join3(a text, b text, c text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$ select df._mk('JOIN', null, null, df._node(a), df._node(b), df._node(c)) $$;

-- Both branches concurrently; the first to finish (success or failure) wins. Operator |.
create function df.race(a text, b text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$ select df._mk('RACE', null, null, df._node(a), df._node(b), null) $$;

-- Run condition (any node), then then_branch if its result is truthy (SPEC §3.4), else
-- else_branch.
create function df."if"(condition text, then_branch text, else_branch text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$
    select df._mk('IF', null, df._node(condition), df._node(then_branch), df._node(else_branch),
                  null)
$$;

-- then_branch if the named SQL result has rows, else else_branch; runs no SQL itself.
create function df.if_rows(result_name text, then_branch text, else_branch text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
as $$
begin
    perform df._check_identifier(result_name, 'result name');
    return df._mk('IF', '{"condition_type":"result_has_rows","result_name":'
                        || to_json(result_name)::text || '}',
                  null, df._node(then_branch), df._node(else_branch), null);
end
$$;

-- Repeat body until a df.break (condition NULL, the default: an infinite loop, like @>) or
-- while condition is truthy after each iteration (do-while).
create function df.loop(body text, condition text default null) returns text
language sql immutable parallel safe
set search_path = pg_catalog
as $$
    select case when body is not null
                then df._mk('LOOP', null, df._node(condition), df._node(body), null, null) end
$$;

-- Name a node's result (referenced later as $name). Operator |=>. Renaming replaces the
-- previous name.
create function df."as"(fut text, name text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
as $$
declare
    v_node text;
    v_head text[];
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
        return v_head[1] || ',"result_name":' || to_json(name)::text
            || right(v_node, -(length(v_head[1]) + coalesce(length(v_head[2]), 0)));
    end if;
    -- Anything else (hand-written JSON): re-emit the top level in canonical key order from
    -- json_each, whose values are verbatim substrings, so the subtrees keep their text.
    return (
        select '{' || string_agg(to_json(k)::text || ':' || v, ',' order by ord, n) || '}'
        from (select e.key as k, e.value::text as v, e.n,
                     case e.key when 'node_type' then 1 when 'query' then 2 else 4 end as ord
              from json_each(v_node::json) with ordinality as e(key, value, n)
              where e.key <> 'result_name'
              union all
              select 'result_name', to_json(name)::text, 0, 3) as parts);
end
$$;

------------------------------------------------------------------------------------------
-- operator functions (20_operators.sql); plain functions, callable directly too
------------------------------------------------------------------------------------------

-- `f |=> 'name'` = df.as(f, 'name').
create function df.as_op(fut text, name text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$ select df."as"(fut, name) $$;

-- `@> body` = df.loop(body): a prefix operator needs a one-argument function.
create function df.loop_op(body text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$ select df.loop(body) $$;

-- `c ?> t`: the first half of an IF, a partial object only !> accepts (ARCHITECTURE §1).
create function df.if_then_op(condition text, then_branch text) returns text
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$
    select '{"_partial_if":true,"condition":' || df._node(condition)
        || ',"then_branch":' || df._node(then_branch) || '}'
$$;

-- `p !> e`: completes a ?> partial into df.if(condition, then_branch, else_branch).
create function df.if_else_op(partial text, else_branch text) returns text
language plpgsql immutable strict parallel safe
set search_path = pg_catalog
as $$
declare
    v_json json;
begin
    begin
        v_json := btrim(partial, E' \t\r\n')::json;
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
    return df."if"((v_json -> 'condition')::text, (v_json -> 'then_branch')::text, else_branch);
end
$$;
-- pgdurable schema, part 20: the seven DSL operators (SPEC §3.1, §9).
--
-- Plain CREATE OPERATOR on text operands, so they parse exactly as in pg_durable. They live
-- in @opschema@: pg_catalog when a superuser installs (they then resolve under any
-- search_path, as the original's do), else public (or --operator-schema). The functions stay
-- in df; dropping df (uninstall) drops the operators with them.
--
-- Precedence: PostgreSQL gives every user-defined operator the same level (the generic
-- operator level, shared with ||), left-associative; tighter than comparisons, IS, NOT,
-- AND, OR; looser than arithmetic and ::. The prefix @> takes only the next operand. So
--   a ~> b & c          = (a ~> b) & c
--   @> a ~> b           = (@> a) ~> b          (b runs after an infinite loop: never)
--   p ~> c ?> t !> e    = ((p ~> c) ?> t) !> e  (works: the THEN yields c's result)
--   c ?> a ~> b !> e    raises: (c ?> a) is a partial, which ~> refuses; write c ?> (a ~> b) !> e
-- None of the seven clashes with a pg_catalog operator on text (checked on PG 15 and 18;
-- tests/sql/test_operators.py keeps checking). & and | exist for integer, bit and inet
-- types; with two untyped literals ('…' & '…') PostgreSQL prefers the string category, so
-- these resolve to the text versions here.

create operator @opschema@.~> (leftarg = text, rightarg = text, function = df.seq);
comment on operator @opschema@.~> (text, text) is 'pg_durable DSL: a then b (df.seq)';

create operator @opschema@.|=> (leftarg = text, rightarg = text, function = df.as_op);
comment on operator @opschema@.|=> (text, text) is 'pg_durable DSL: name a result (df.as)';

create operator @opschema@.& (leftarg = text, rightarg = text, function = df."join");
comment on operator @opschema@.& (text, text) is 'pg_durable DSL: run both, await all (df.join)';

create operator @opschema@.| (leftarg = text, rightarg = text, function = df.race);
comment on operator @opschema@.| (text, text) is 'pg_durable DSL: run both, first wins (df.race)';

create operator @opschema@.?> (leftarg = text, rightarg = text, function = df.if_then_op);
comment on operator @opschema@.?> (text, text)
    is 'pg_durable DSL: condition ?> then_branch, completed by !> (df.if_then_op)';

create operator @opschema@.!> (leftarg = text, rightarg = text, function = df.if_else_op);
comment on operator @opschema@.!> (text, text)
    is 'pg_durable DSL: (condition ?> then_branch) !> else_branch (df.if)';

create operator @opschema@.@> (rightarg = text, function = df.loop_op);
comment on operator @opschema@.@> (none, text) is 'pg_durable DSL: infinite loop (df.loop)';
-- pgdurable schema, part 30: control — df.start, df.signal, df.cancel, df.status, df.result,
-- df.error, df.await_instance (+ deprecated df.wait_for_completion), the graph validator and
-- flattener df.start uses (shared with df.explain), and the engine helpers they call.
--
--   df._graph_flatten(jsonb)   validate a graph value, return its node rows in pre-order
--   df._graph_value(text)      auto-wrap a df.start/df.explain argument into a graph jsonb
--   df.start                   SPEC §4 validation order, then instances + nodes + enqueue
--   @engine@._invoker()        the role that called into a SECURITY DEFINER helper
--   @engine@._schema_ready_v1  readiness (docs/decisions.md D3)
--   @engine@._enqueue_v1       runs row + the 'start' task (ARCHITECTURE §2)
--   @engine@._new_start_v1     transaction_mode 'new': df.start through a dblink session
--   @engine@._signal_v1 / _cancel_v1   transactional signal / cancel (docs/decisions.md D16, D17)
--
-- SQLSTATEs: standard codes where one fits — 22023 invalid_parameter_value (bad arguments,
-- bad graphs), 54000 program_limit_exceeded (graph limits), 3D000 (unknown database),
-- 42501 insufficient_privilege, P0002 no_data_found (unknown/invisible instance),
-- 55000 object_not_in_prerequisite_state (not ready, terminal instance, dblink missing),
-- 0A000 feature_not_supported (called inside a workflow), 55P03 lock_not_available (no
-- launch slot), 57014 query_canceled (await timeout, as statement_timeout does).
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
set search_path = pg_catalog
as $$
begin
    return p_text::jsonb;
exception when others then
    return null;
end;
$$;

-- Auto-wrap (SPEC §3): a JSON object with a node_type is a graph, a JSON object with a
-- non-text/unknown node_type raises (in df._graph_flatten), anything else is one SQL node.
create function df._graph_value(p_input text) returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog
as $$
declare
    v_json jsonb;
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

-- Validate a whole graph value and flatten it (ARCHITECTURE §2). Returns a jsonb array of
-- {id, node_type, query, result_name, left_node, right_node} in pre-order with child order
-- condition_node, left_node, right_node, extra_nodes. Raises on the first invalid node with
-- its path (root.left_node.…). Node ids are fresh random 8-hex values, handed out in sorted
-- order along the pre-order (a convenience for readers, not a contract).
--
-- The walk is one recursive CTE; a child is only descended into when it is a JSON object,
-- and the walk stops one level past the depth limit (so a hostile value cannot make it run
-- away) and one row past the node limit (LIMIT stops a recursive CTE early).
create function df._graph_flatten(p_graph jsonb) returns jsonb
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    c_max_depth constant integer := 256;
    c_max_nodes constant integer := 10000;
    v_walk   jsonb;
    v_count  integer;
    v_ids    text[];
    v_node   jsonb;
    v_obj    jsonb;
    v_type   text;
    v_where  text;
    v_query  jsonb;
    v_cfg    jsonb;
    v_leaf   boolean;
    v_result jsonb;
begin
    -- Cheap guard first: a value nested far past the limit is rejected in one C-level
    -- jsonpath scan, before the walk below (which copies subtrees per level) ever sees it.
    -- 600 JSON levels > the deepest legal graph (256 node levels, ≤ 2 JSON levels each).
    if jsonb_path_exists(p_graph, 'lax $.**{600}') then
        raise exception 'durable function graph exceeds the maximum nesting depth of % (at root)',
            c_max_depth using errcode = '54000';
    end if;
    if p_graph is null or jsonb_typeof(p_graph) <> 'object' then
        raise exception 'a durable function graph must be a JSON object'
            using errcode = '22023';
    end if;
    with recursive walk(obj, path, names, depth) as (
        select p_graph, array[]::integer[], 'root'::text, 1
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
            select e.value, 2 + e.ord::integer, 'extra_nodes[' || (e.ord - 1) || ']'
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
        if (v_node ->> 'd')::integer > c_max_depth then
            raise exception 'durable function graph exceeds the maximum nesting depth of % (at %)',
                c_max_depth, v_where using errcode = '54000';
        end if;
        if jsonb_typeof(v_obj -> 'node_type') is distinct from 'string' then
            raise exception 'Unknown node_type ''%'' (at %)', coalesce(v_obj ->> 'node_type', 'null'),
                v_where using errcode = '22023';
        end if;
        v_type := v_obj ->> 'node_type';
        if v_type not in ('SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'BREAK', 'SLEEP',
                          'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART') then
            raise exception 'Unknown node_type ''%'' (at %)', v_type, v_where using errcode = '22023';
        end if;
        if v_obj -> 'result_name' is not null and jsonb_typeof(v_obj -> 'result_name') <> 'null'
           and (jsonb_typeof(v_obj -> 'result_name') <> 'string'
                or (v_obj ->> 'result_name') !~ '^[A-Za-z_][A-Za-z0-9_]*$') then
            raise exception 'result_name % is not a valid identifier (at %)',
                (v_obj -> 'result_name')::text, v_where using errcode = '22023';
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
        v_leaf := v_type in ('SQL', 'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART');
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
                    v_query::text, v_where using errcode = '22023';
            end if;
            if v_type in ('BREAK', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART') then
                v_cfg := df._try_jsonb(v_query #>> '{}');
                if jsonb_typeof(v_cfg) is distinct from 'object' then
                    raise exception 'query of a % node must be valid JSON config (at %)', v_type, v_where
                        using errcode = '22023';
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
            -- Hand-written configs get the same checks as the DSL builders (SPEC §5: df.start
            -- validates cron and HTTP arguments too): re-build the leaf with its builder.
            begin
                case v_type
                    when 'SLEEP' then
                        perform df.sleep((v_query #>> '{}')::bigint);
                    when 'WAIT_SCHEDULE' then
                        perform df.wait_for_schedule(v_cfg ->> 'cron_expr');
                    when 'SIGNAL' then
                        perform df.wait_for_signal(v_cfg ->> 'signal_name',
                                                   (v_cfg ->> 'timeout_seconds')::integer);
                    -- the builders' checks without df.http's EXECUTE privilege: a role without
                    -- it may start the graph and fails at run time (SPEC §3.8 gate 0)
                    when 'HTTP' then
                        perform df._check_http('df.http', v_cfg ->> 'url', v_cfg ->> 'method',
                                               array['GET', 'POST', 'PUT', 'DELETE', 'PATCH'],
                                               nullif(v_cfg -> 'headers', 'null'::jsonb),
                                               coalesce((v_cfg ->> 'timeout_seconds')::integer, 30));
                    when 'HTTP_MULTIPART' then
                        perform df._check_http('df.http_multipart', v_cfg ->> 'url',
                                               v_cfg ->> 'method', array['POST', 'PUT', 'PATCH'],
                                               nullif(v_cfg -> 'headers', 'null'::jsonb),
                                               coalesce((v_cfg ->> 'timeout_seconds')::integer, 30));
                        if jsonb_typeof(v_cfg -> 'parts') is distinct from 'array'
                           or jsonb_array_length(v_cfg -> 'parts') = 0 then
                            raise exception 'df.http_multipart: parts must be a non-empty JSON array'
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
            if v_type = 'LOOP' then
                if jsonb_typeof(v_node #> '{c,right_node}') = 'object' then
                    raise exception 'LOOP node cannot have a right_node (at %)', v_where
                        using errcode = '22023';
                end if;
            elsif jsonb_typeof(v_node #> '{c,right_node}') is distinct from 'object' then
                raise exception '% node needs a right_node (at %)', v_type, v_where using errcode = '22023';
            end if;
            if v_type <> 'JOIN' and jsonb_typeof(v_node #> '{c,extra_nodes}') = 'array' then
                raise exception 'extra_nodes is only allowed on JOIN nodes (at %)', v_where
                    using errcode = '22023';
            end if;
            if v_type in ('THEN', 'RACE', 'JOIN')
               and jsonb_typeof(v_node #> '{c,condition_node}') = 'object' then
                raise exception 'condition_node is only allowed on IF and LOOP nodes (at %)', v_where
                    using errcode = '22023';
            end if;
            if v_type = 'IF' then
                v_cfg := df._try_jsonb(v_query #>> '{}');
                if jsonb_typeof(v_node #> '{c,condition_node}') = 'object' then
                    if v_query is not null then
                        raise exception 'IF node has both a condition_node and a query (at %)', v_where
                            using errcode = '22023';
                    end if;
                elsif v_query is null then
                    raise exception 'IF node needs a condition_node or a result_has_rows query (at %)',
                        v_where using errcode = '22023';
                elsif v_cfg is null or jsonb_typeof(v_cfg) <> 'object' then
                    raise exception 'query in IF must be valid JSON config (at %)', v_where
                        using errcode = '22023';
                elsif v_cfg ? 'condition_node' then
                    -- the stored (flattened) form: ids inside query are not a graph value
                    raise exception 'condition_node in IF must be a first-class Durofut field, not part of query (at %)',
                        v_where using errcode = '22023';
                elsif v_cfg ->> 'condition_type' is distinct from 'result_has_rows'
                      or jsonb_typeof(v_cfg -> 'result_name') is distinct from 'string'
                      or (v_cfg ->> 'result_name') !~ '^[A-Za-z_][A-Za-z0-9_]*$' then
                    raise exception 'query in IF must be valid JSON config: {"condition_type":"result_has_rows","result_name":<identifier>} (at %)',
                        v_where using errcode = '22023';
                end if;
            elsif v_query is not null then
                raise exception '% node cannot have a query (at %)', v_type, v_where using errcode = '22023';
            end if;
        end if;
    end loop;

    -- ids: v_count distinct random 8-hex values (collisions are re-drawn)
    loop
        select array_agg(id order by id) into v_ids
        from (select distinct right(replace(gen_random_uuid()::text, '-', ''), 8) as id
              from generate_series(1, v_count)) g;
        exit when cardinality(v_ids) = v_count;
    end loop;

    with n as (
        select (e.ord)::integer as pos, e.value as w,
               array(select jsonb_array_elements_text(e.value -> 'p')::integer) as path
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
                       then jsonb_build_object('condition_node', k.cond_id)::text
                   when i.w #>> '{o,node_type}' = 'JOIN' and k.extra_ids is not null
                       then jsonb_build_object('extra_nodes', k.extra_ids)::text
                   when i.w #>> '{o,node_type}' in ('THEN', 'RACE', 'JOIN', 'LOOP') then null
                   else i.w #>> '{o,query}' end,
               'result_name', i.w #>> '{o,result_name}',
               'left_node', k.left_id,
               'right_node', k.right_id)
           order by i.pos)
    into v_result
    from ided i
    left join kids k on k.parent = i.path;
    return v_result;
end;
$$;

------------------------------------------------------------------------------------------
-- engine helpers (SECURITY DEFINER; only reachable through df.grant_usage)
------------------------------------------------------------------------------------------

-- The role that called into a SECURITY DEFINER helper (see the header). Not a definer itself.
-- Inside a workflow step, session_user is the service's role: the step's own role comes from
-- the row the worker wrote for this very transaction (@engine@.step_sessions).
create function @engine@._invoker() returns name
language sql stable
set search_path = pg_catalog
as $$
    select coalesce(
        (select r.rolname from @engine@.step_sessions s
         join pg_catalog.pg_roles r on r.oid = s.role
         where s.pid = pg_catalog.pg_backend_pid()
           and s.xid = pg_catalog.txid_current_if_assigned()),
        case when coalesce(current_setting('role', true), 'none') in ('none', '')
             then session_user else current_setting('role', true)::name end)
$$;

-- May the calling role act on an instance submitted by p_owner? Owners, and roles that bypass
-- RLS anyway (superusers, BYPASSRLS roles), the same set df.instances shows the row to.
create function @engine@._may_act(p_owner regrole) returns boolean
language sql stable
set search_path = pg_catalog
as $$
    select exists (select 1 from pg_catalog.pg_roles r
                   where r.rolname = @engine@._invoker()
                     and (r.oid = p_owner::oid or r.rolsuper or r.rolbypassrls))
$$;

create function @engine@._schema_ready_v1() returns integer
language sql stable security definer
set search_path = pg_catalog
as $$ select coalesce((select w.schema_version from @engine@._worker_ready w), 0) $$;

-- Hand a freshly written instance to the engine: the frozen vars snapshot and the first task.
-- Only for a pending instance of the caller that the engine has not seen yet, so a role cannot
-- inject vars into someone else's instance.
create function @engine@._enqueue_v1(p_instance_id varchar, p_vars jsonb) returns void
language plpgsql volatile security definer
set search_path = pg_catalog
as $$
declare
    v_inst record;
begin
    select i.id, i.root_node, i.status, i.submitted_by, i.database into v_inst
    from df.instances i where i.id = p_instance_id
    for update;
    if not found or not @engine@._may_act(v_inst.submitted_by) then
        raise exception 'Instance % not found or access denied', p_instance_id using errcode = 'P0002';
    end if;
    if v_inst.status <> 'pending' then
        raise exception 'Instance % is %, only pending instances can be enqueued', p_instance_id,
            v_inst.status using errcode = '55000';
    end if;
    insert into @engine@.runs (instance_id, vars) values (p_instance_id, coalesce(p_vars, '{}'))
    on conflict (instance_id) do nothing;
    if not found then
        raise exception 'Instance % was already handed to the engine', p_instance_id
            using errcode = '55000';
    end if;
    insert into @engine@.tasks (instance_id, node_id, gen, kind, due_at, submitted_by, database)
    values (p_instance_id, v_inst.root_node, 0, 'start', now(), v_inst.submitted_by, v_inst.database);
end;
$$;

-- df.signal's write: durable inbox row + wake the instance's signal waits (the worker re-parks
-- a wait that finds no signal of its name, tasks.deadline keeps its timeout). Locks the runs
-- row first, like every writer of an instance (50_engine.sql lock order).
create function @engine@._signal_v1(p_instance_id varchar, p_name text, p_data jsonb) returns void
language plpgsql volatile security definer
set search_path = pg_catalog
as $$
declare
    v_owner  regrole;
    v_status text;
begin
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
    update @engine@.tasks t set due_at = now()
    where t.instance_id = p_instance_id and t.kind = 'signal' and t.lease_owner is null;
    perform pg_notify('pgdurable_work', p_instance_id);
end;
$$;

-- df.cancel's write (docs/decisions.md D16/D17). Lock order as every writer: runs row, then the instance.
create function @engine@._cancel_v1(p_instance_id varchar, p_reason text) returns text
language plpgsql volatile security definer
set search_path = pg_catalog
as $$
declare
    v_owner  regrole;
    v_status text;
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
        return format('Instance %s is already %s', p_instance_id, v_status);
    end if;
    update df.instances set status = 'cancelled', updated_at = now() where id = p_instance_id;
    update @engine@.runs set cancel_reason = p_reason where instance_id = p_instance_id;
    delete from @engine@.tasks where instance_id = p_instance_id;
    update df.nodes
    set status = 'failed', result = to_jsonb('cancelled: ' || p_reason), updated_at = now()
    where instance_id = p_instance_id and status = 'running';
    -- the worker running a step of this instance interrupts it (pg_cancel_backend)
    perform pg_notify('pgdurable_cancel', p_instance_id);
    return format('Instance %s cancelled: %s', p_instance_id, p_reason);
end;
$$;

-- transaction_mode 'new': run a caller-mode df.start in a separate session as the calling
-- role and commit it there. SECURITY DEFINER because dblink refuses password-less connections
-- for non-superusers; the connection is opened only for the invoker's own role (checked
-- against the role df.start ran as), so this gives no one another identity.
create function @engine@._new_start_v1(p_role name, p_fut text, p_label text, p_database text)
returns varchar
language plpgsql volatile security definer
set search_path = pg_catalog
as $$
declare
    v_dblink name;
    v_host   text;
    v_conn   text;
    v_name   text := 'pgdurable_start_' || pg_backend_pid();
    v_id     varchar;
begin
    if p_role is distinct from @engine@._invoker() then
        raise exception 'transaction_mode ''new'' must be called directly by the submitting role (%)', p_role
            using errcode = '42501';
    end if;
    select n.nspname into v_dblink
    from pg_extension e join pg_namespace n on n.oid = e.extnamespace
    where e.extname = 'dblink';
    if v_dblink is null then
        raise exception 'transaction_mode ''new'' needs the dblink extension (CREATE EXTENSION dblink)'
            using errcode = '55000';
    end if;
    -- reach this server the way the caller did: its TCP address, else the first socket dir
    v_host := coalesce(host(inet_server_addr()),
                       nullif(btrim(split_part(current_setting('unix_socket_directories'), ',', 1)), ''),
                       '127.0.0.1');
    v_conn := format('dbname=%s user=%s host=%s port=%s application_name=%s',
                     quote_literal(current_database()), quote_literal(p_role),
                     quote_literal(v_host),
                     coalesce(inet_server_port()::text, current_setting('port')),
                     quote_literal('pgdurable df.start new'));
    execute format('select %I.dblink_connect(%L, %L)', v_dblink, v_name, v_conn);
    begin
        execute format('select %I.dblink_exec(%L, %L)', v_dblink, v_name,
                       'set lock_timeout = ''30s''; set statement_timeout = ''30s''');
        execute format('select t.id from %I.dblink(%L, %L) as t(id varchar)', v_dblink, v_name,
                       format('select df.start(%L, %L, %L, ''caller'')', p_fut, p_label, p_database))
            into v_id;
        execute format('select %I.dblink_disconnect(%L)', v_dblink, v_name);
    exception when others then
        execute format('select %I.dblink_disconnect(%L)', v_dblink, v_name);
        raise;
    end;
    return v_id;
end;
$$;

------------------------------------------------------------------------------------------
-- df.start
------------------------------------------------------------------------------------------

create function df.start(fut text, label text default null, database text default null,
                         transaction_mode text default 'caller')
returns varchar
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    -- 'PGDF': the class of the 'new' launch slots (advisory locks, one key per slot)
    c_slot_class constant integer := x'50474446'::integer;
    v_mode     text := lower(btrim(coalesce(transaction_mode, '')));
    v_graph    jsonb;
    v_nodes    jsonb;
    v_me       regrole;
    v_role     record;
    v_id       varchar;
    v_tries    integer := 0;
    v_vars     jsonb;
    v_slots    integer;
    v_timeout  numeric;
    v_deadline timestamptz;
    v_slot     integer;
begin
    if v_mode not in ('caller', 'new') then
        raise exception 'invalid transaction_mode ''%'': expected ''caller'' or ''new''', transaction_mode
            using errcode = '22023';
    end if;
    if v_mode = 'new' and @engine@.in_workflow() then
        raise exception 'df.start(transaction_mode => ''new'') cannot be called inside a workflow'
            using errcode = '0A000';
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
    if database is not null and not exists (select 1 from pg_database d where d.datname = database) then
        raise exception 'database "%" does not exist', database using errcode = '3D000';
    end if;
    -- 3. identity: the submitting role must be able to log in, and not be a superuser unless allowed
    select r.oid, r.rolname, r.rolcanlogin, r.rolsuper into v_role
    from pg_roles r where r.rolname = current_user;
    v_me := v_role.oid::regrole;
    if not v_role.rolcanlogin then
        raise exception 'role "%" cannot submit durable functions: it lacks the LOGIN attribute', current_user
            using errcode = '42501',
                  hint = 'steps run as the submitting role; ALTER ROLE ... LOGIN or submit as another role';
    end if;
    if v_role.rolsuper and lower(@engine@.setting('enable_superuser_instances', 'off'))
                           not in ('on', 'true', 'yes', '1') then
        raise exception 'superuser "%" cannot submit durable functions while pg_durable.enable_superuser_instances is off',
            current_user using errcode = '42501',
                               hint = 'submit as an ordinary role given df.grant_usage';
    end if;
    -- 4. readiness (docs/decisions.md D3)
    if @engine@._schema_ready_v1() < 1 then
        raise exception 'pg_durable background worker not yet initialized — try again in a moment'
            using errcode = '55000';
    end if;
    -- 5. validate + flatten (raises before anything is written)
    v_nodes := df._graph_flatten(v_graph);

    if v_mode = 'new' then
        -- take one of max_new_transaction_starts cluster-wide slots (session advisory locks,
        -- released below); poll every 100 ms and give up before any session is opened
        v_slots := greatest(1, @engine@.setting('max_new_transaction_starts', '2')::integer);
        v_timeout := greatest(1, @engine@.setting('new_transaction_start_timeout', '5')::numeric);
        v_deadline := clock_timestamp() + make_interval(secs => v_timeout);
        <<wait>>
        loop
            for v_try in 0 .. v_slots - 1 loop
                if pg_try_advisory_lock(c_slot_class, v_try) then
                    v_slot := v_try;
                    exit wait;
                end if;
            end loop;
            if clock_timestamp() >= v_deadline then
                raise exception 'Timed out after %s waiting for a launch slot (pg_durable.max_new_transaction_starts=%)',
                    v_timeout, v_slots using errcode = '55P03';
            end if;
            perform pg_sleep(0.1);
        end loop;
        begin
            v_id := @engine@._new_start_v1(current_user, fut, label, database);
        exception when others then
            perform pg_advisory_unlock(c_slot_class, v_slot);
            raise;
        end;
        perform pg_advisory_unlock(c_slot_class, v_slot);
        return v_id;
    end if;

    -- 6. reserve an instance id: ON CONFLICT sees every row (past RLS), so ids stay global
    loop
        v_tries := v_tries + 1;
        insert into df.instances (id, label, root_node, submitted_by, database)
        values (right(replace(gen_random_uuid()::text, '-', ''), 8), label, v_nodes -> 0 ->> 'id',
                v_me, database)
        on conflict (id) do nothing
        returning id into v_id;
        exit when v_id is not null;
        if v_tries > 10 then
            raise exception 'could not reserve an instance id after 10 attempts' using errcode = '55000';
        end if;
    end loop;
    -- 7. all nodes in one statement (FKs are deferred to commit)
    insert into df.nodes (id, instance_id, node_type, query, result_name, left_node, right_node,
                          submitted_by, database)
    select n.id, v_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, v_me, database
    from jsonb_to_recordset(v_nodes) as n(id varchar, node_type text, query text, result_name text,
                                          left_node varchar, right_node varchar);
    -- 8. the vars snapshot (this transaction's view: own uncommitted rows included)
    select coalesce(jsonb_object_agg(v.name, v.value), '{}') into v_vars
    from df.vars v where v.owner = v_me;
    -- 9. the engine's first task, then wake a worker (delivered at commit)
    perform @engine@._enqueue_v1(v_id, v_vars);
    perform pg_notify('pgdurable_work', v_id);
    return v_id;
end;
$$;

------------------------------------------------------------------------------------------
-- signal, cancel, status, result, error, await
------------------------------------------------------------------------------------------

create function df.signal(instance_id text, signal_name text, data text default '{}')
returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_data jsonb;
begin
    if coalesce(instance_id, '') = '' or coalesce(signal_name, '') = '' then
        raise exception 'df.signal: instance_id and signal_name must be non-empty' using errcode = '22023';
    end if;
    -- visibility under RLS is the ownership check users see
    if not exists (select 1 from df.instances i where i.id = instance_id) then
        raise exception 'Instance not found or access denied: %', instance_id using errcode = 'P0002';
    end if;
    v_data := coalesce(df._try_jsonb(data), to_jsonb(data), 'null'::jsonb);
    perform @engine@._signal_v1(instance_id, signal_name, v_data);
    return 'OK';
end;
$$;

create function df.cancel(instance_id text, reason text default 'Cancelled by user')
returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
begin
    if not exists (select 1 from df.instances i where i.id = instance_id) then
        raise exception 'Instance not found or access denied: %', instance_id using errcode = 'P0002';
    end if;
    return @engine@._cancel_v1(instance_id, coalesce(reason, 'Cancelled by user'));
end;
$$;

create function df.status(instance_id text) returns text
language sql stable
set search_path = pg_catalog
as $$ select i.status from df.instances i where i.id = $1 $$;

-- The root node's result, only for a completed instance (SPEC §4: not the error of a failed one).
create function df.result(instance_id text) returns text
language sql stable
set search_path = pg_catalog
as $$
    select n.result::text
    from df.instances i
    join df.nodes n on n.instance_id = i.id and n.id = i.root_node
    where i.id = $1 and i.status = 'completed'
$$;

-- The failing node of a failed instance: a failed node none of whose children failed (the
-- leaf where the failure started; children include the ids inside IF/LOOP/JOIN query config);
-- with several (JOIN branches) the one that finished first.
create function df.error(instance_id text) returns jsonb
language sql stable
set search_path = pg_catalog
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
          and coalesce((f.status_details ->> 'abandoned')::boolean, false) = false
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
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_status   text;
    v_deadline timestamptz;
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
language plpgsql volatile
set search_path = pg_catalog
as $$
begin
    raise warning 'df.wait_for_completion is deprecated; use df.await_instance';
    return df.await_instance(instance_id, timeout_seconds);
end;
$$;
-- pgdurable schema, part 40: inspection and administration.
--
--   df._node_tree               read-time tree walk: pre-order path + inferred status (ARCH §4)
--   df.instance_nodes           12 columns (+ the legacy (text, integer) overload)
--   df.list_instances           basic and paged (opaque keyset cursor) overloads
--   df.instance_info / df.instance_executions / df.metrics
--   df.explain                  live instance tree or dry run of a graph / DSL text / SQL
--   df.setvar/getvar/unsetvar/clearvars, df.version/run/target_database/duroxide_schema
--   df.workers                  view over @engine@.workers
--   df.grant_usage / df.revoke_usage
--
-- Everything here is SECURITY INVOKER and reads df.instances/df.nodes under RLS, so a role
-- sees only its own instances; df.metrics (engine-wide, admin-only) is the one definer.
--
-- Our choices where SPEC §4 leaves room (documented in docs too):
--   function_name        always 'pgdurable' (the orchestration name; labels are in `label`)
--   execution_count      highest generation / loop iteration any node reports, 0 before a
--                        worker loaded the instance
--   output               the root node's result (JSON text), whatever the status
--   instance_executions  one row per execution_id found in status_details ('<id>::<gen>')
--   status words         df's own (pending/running/completed/failed/cancelled) everywhere

------------------------------------------------------------------------------------------
-- inferred status
------------------------------------------------------------------------------------------

-- One row per node of the instance reachable from its root, with its pre-order path and the
-- inferred status (ARCHITECTURE §4):
--   superseded  a node under a LOOP whose seq < that loop's iter_seq reads as pending
--               (inferred_from = the loop); decisions of a superseded IF/RACE/THEN are stale
--               and are not applied to its children
--   skipped     a pending/running node under an IF's untaken arm, right of a THEN whose left
--               failed, under a decided RACE's loser (inferred_from = the deciding ancestor,
--               the outermost one), or of a terminal instance (inferred_from = the root)
-- The walk stops at depth 300 so hand-written cyclic rows cannot loop forever.
create function df._node_tree(p_instance_id text)
returns table (node_id varchar, path integer[], role text, inferred_status text,
               inferred_from varchar)
language sql stable
set search_path = pg_catalog
as $$
    with recursive inst as (
        select i.id, i.root_node, i.status from df.instances i where i.id = p_instance_id
    ), n as (
        select x.id, x.node_type, x.left_node, x.right_node, x.status, x.status_details as sd,
               case when x.node_type in ('IF', 'LOOP', 'JOIN') and x.query like '{%'
                    then df._try_jsonb(x.query) end as qj,
               case when jsonb_typeof(x.status_details -> 'seq') = 'number'
                    then (x.status_details ->> 'seq')::numeric end as seq,
               case when x.node_type = 'LOOP' and jsonb_typeof(x.status_details -> 'iter_seq') = 'number'
                    then (x.status_details ->> 'iter_seq')::numeric end as iter_seq
        from df.nodes x where x.instance_id = p_instance_id
    ), walk(node_id, path, role, depth, skip_from, loop_seq, loop_id) as (
        select i.root_node::varchar, array[]::integer[], 'root'::text, 1, null::varchar, null::numeric,
               null::varchar
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
            select (p.qj ->> 'condition_node')::varchar as child, 0 as ord,
                   case p.node_type when 'LOOP' then 'while' else 'condition' end as role,
                   null::varchar as skip_here
            where p.node_type in ('IF', 'LOOP') and jsonb_typeof(p.qj -> 'condition_node') = 'string'
            union all
            select p.left_node, 1,
                   case p.node_type when 'IF' then 'then' when 'LOOP' then 'body'
                                    when 'THEN' then 'first' else 'branch 1' end,
                   case when (p.node_type = 'IF' and p.sd ->> 'branch' = 'else')
                          or (p.node_type = 'RACE' and p.sd ->> 'winner' <> p.left_node)
                        then p.id end
            where p.left_node is not null
            union all
            select p.right_node, 2,
                   case p.node_type when 'IF' then 'else' when 'THEN' then 'then' else 'branch 2' end,
                   case when (p.node_type = 'IF' and p.sd ->> 'branch' = 'then')
                          or (p.node_type = 'RACE' and p.sd ->> 'winner' <> p.right_node)
                          or (p.node_type = 'THEN' and exists (select 1 from n l
                                                               where l.id = p.left_node
                                                                 and l.status = 'failed'))
                        then p.id end
            where p.right_node is not null
            union all
            select e.value::varchar, 2 + e.ord::integer, 'branch ' || (2 + e.ord), null::varchar
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
           case when v.eff in ('pending', 'running') and w.skip_from is not null then 'skipped'
                when v.eff in ('pending', 'running') and i.status in ('completed', 'failed', 'cancelled')
                    then 'skipped'
                else v.eff end,
           case when v.eff in ('pending', 'running') and w.skip_from is not null then w.skip_from
                when v.eff in ('pending', 'running') and i.status in ('completed', 'failed', 'cancelled')
                    then i.root_node
                when v.superseded then w.loop_id end
    from n x
    cross join inst i
    left join placed w on w.node_id = x.id
    cross join lateral (
        select coalesce(x.seq < w.loop_seq, false) as superseded,
               case when coalesce(x.seq < w.loop_seq, false) then 'pending' else x.status end as eff
    ) v
    order by w.path nulls last, x.id
$$;

create function df.instance_nodes(instance_id text)
returns table (node_id varchar, node_type text, query text, result_name text, left_node varchar,
               right_node varchar, status text, result text, status_details text,
               inferred_status text, inferred_status_from_ancestor_id varchar,
               updated_at timestamptz)
language sql stable
set search_path = pg_catalog
as $$
    select n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           n.result::text, n.status_details::text, t.inferred_status, t.inferred_from, n.updated_at
    from df.nodes n
    join df._node_tree($1) t on t.node_id = n.id
    where n.instance_id = $1
    order by t.path nulls last, n.id
$$;

-- Legacy overload (before inferred status existed): the physical columns only, at most
-- limit_count rows in tree order.
create function df.instance_nodes(instance_id text, limit_count integer)
returns table (node_id varchar, node_type text, query text, result_name text, left_node varchar,
               right_node varchar, status text, result text, updated_at timestamptz)
language sql stable
set search_path = pg_catalog
as $$
    select x.node_id, x.node_type, x.query, x.result_name, x.left_node, x.right_node, x.status,
           x.result, x.updated_at
    from df.instance_nodes($1) x
    limit greatest(coalesce($2, 100), 0)
$$;

------------------------------------------------------------------------------------------
-- listing
------------------------------------------------------------------------------------------

-- The paged listing; the basic overload is a projection of it. Keyset pagination on the
-- (created_at desc, id) index order: the cursor is the hex of 'v1:<created_at µs>:<id>' of a
-- page's last row, repeated on every row of the page and NULL on the last page.
create function df.list_instances(status_filter text, limit_count integer, label_filter text,
                                  after_cursor text default null)
returns table (instance_id varchar, label text, function_name text, status text,
               execution_count integer, output text, created_at timestamptz,
               completed_at timestamptz, next_cursor text)
language plpgsql stable
set search_path = pg_catalog
as $$
#variable_conflict use_column
declare
    v_max    integer := @engine@.setting('list_instances_max_limit', '1000')::integer;
    v_limit  integer := coalesce(limit_count, 100);
    v_plain  text;
    v_parts  text[];
    v_at     timestamptz;
    v_id     varchar;
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
        v_at := timestamptz 'epoch' + v_parts[1]::bigint * interval '1 microsecond';
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
    select x.id, x.label, 'pgdurable'::text, x.status,
           -- 0 until a worker stamped a node, then at least 1
           (select case when count(*) = 0 then 0
                        else greatest(1, coalesce(max(greatest(
                            case when jsonb_typeof(n.status_details -> 'gen') = 'number'
                                 then (n.status_details ->> 'gen')::numeric end,
                            case when jsonb_typeof(n.status_details -> 'iteration') = 'number'
                                 then (n.status_details ->> 'iteration')::numeric end)), 1))::integer end
            from df.nodes n where n.instance_id = x.id and n.status_details is not null),
           (select r.result::text from df.nodes r where r.instance_id = x.id and r.id = x.root_node),
           x.created_at, x.completed_at,
           max(case when x.total > v_limit and x.rn = v_limit
                    then encode(convert_to('v1:' || (extract(epoch from x.created_at) * 1000000)::bigint
                                           || ':' || x.id, 'SQL_ASCII'), 'hex') end) over ()
    from numbered x
    where x.rn <= v_limit
    order by x.rn;
end;
$$;

create function df.list_instances(status_filter text default null, limit_count integer default 100)
returns table (instance_id varchar, label text, function_name text, status text,
               execution_count integer, output text)
language sql stable
set search_path = pg_catalog
as $$
    select l.instance_id, l.label, l.function_name, l.status, l.execution_count, l.output
    from df.list_instances($1, $2, null::text, null::text) l
$$;

create function df.instance_info(instance_id text)
returns table (instance_id varchar, label text, function_name text, function_version text,
               current_execution_id text, status text, output text)
language sql stable
set search_path = pg_catalog
as $$
    select i.id, i.label, 'pgdurable'::text, '@version@'::text,
           (select n.status_details ->> 'execution_id' from df.nodes n
            where n.instance_id = i.id and n.status_details ? 'execution_id'
            order by n.updated_at desc, n.id limit 1),
           i.status,
           (select r.result::text from df.nodes r where r.instance_id = i.id and r.id = i.root_node)
    from df.instances i where i.id = $1
$$;

-- Executions = the distinct execution_ids the worker stamped on the nodes, newest first.
create function df.instance_executions(instance_id text, limit_count integer default 5)
returns table (execution_id text, status text, event_count bigint, duration_ms bigint, output text)
language sql stable
set search_path = pg_catalog
as $$
    select e.execution_id,
           case when bool_or(n.status = 'failed') then 'failed'
                when bool_or(n.status in ('running', 'pending')) then 'running'
                else 'completed' end,
           count(*),
           (extract(epoch from max(f.finished_at) - min(f.started_at)) * 1000)::bigint,
           max(n.result::text) filter (where n.id = i.root_node)
    from df.instances i
    join df.nodes n on n.instance_id = i.id
    cross join lateral (select n.status_details ->> 'execution_id' as execution_id) e
    cross join lateral (
        select case when n.status_details ->> 'started_at' ~ '^\d{4}-' then (n.status_details ->> 'started_at')::timestamptz end as started_at,
               case when n.status_details ->> 'finished_at' ~ '^\d{4}-' then (n.status_details ->> 'finished_at')::timestamptz end as finished_at
    ) f
    where i.id = $1 and e.execution_id is not null
    group by e.execution_id
    order by max(n.updated_at) desc, e.execution_id desc
    limit least(greatest(coalesce($2, 5), 0), 10000)
$$;

-- Engine-wide counters (admin-only: PUBLIC EXECUTE is revoked in 90_grants.sql, so the
-- definer's view of every role's rows is reachable only by roles given it explicitly).
--   total_executions  distinct execution ids stamped on nodes (≈ activations of scopes)
--   total_events      node state changes recorded by workers + signals in the inbox
create function df.metrics()
returns table (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
language sql stable security definer
set search_path = pg_catalog
as $$
    select (select count(*) from df.instances),
           (select count(*) from df.instances where status = 'running'),
           (select count(*) from df.instances where status = 'completed'),
           (select count(*) from df.instances where status = 'failed'),
           (select count(distinct status_details ->> 'execution_id') from df.nodes),
           (select count(*) from df.nodes where status <> 'pending')
             + (select count(*) from @engine@.signals)
$$;

------------------------------------------------------------------------------------------
-- explain
------------------------------------------------------------------------------------------

-- Render a node map {id: {t, q, n, l, r, c, x, m}} as an indented tree, iteratively (an
-- explicit stack; plpgsql recursion 256 deep could exhaust the C stack). Unnamed THEN chains
-- are flattened into one line per element, every element after the first prefixed `→ `, so
-- there is exactly one → per THEN edge. m is the inferred status (NULL = no mark, dry run).
create function df._explain_render(p_nodes jsonb, p_root text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
    v_ids    text[] := array[p_root];
    v_ind    integer[] := array[0];
    v_pre    text[] := array[''];
    v_lines  text[] := array[]::text[];
    v_id     text;
    v_indent integer;
    v_prefix text;
    v_node   jsonb;
    v_cfg    jsonb;
    v_label  text;
    v_mark   text;
    v_kids   text[];
    v_roles  text[];
    v_k      integer;
    v_top    integer;
begin
    while cardinality(v_ids) > 0 loop
        v_top := cardinality(v_ids);
        v_id := v_ids[v_top]; v_indent := v_ind[v_top]; v_prefix := v_pre[v_top];
        v_ids := v_ids[1:v_top - 1]; v_ind := v_ind[1:v_top - 1]; v_pre := v_pre[1:v_top - 1];
        if cardinality(v_lines) > 20000 then
            v_lines := v_lines || '…'::text;
            exit;
        end if;
        v_node := p_nodes -> v_id;
        if v_node is null then
            v_lines := v_lines || (repeat(' ', v_indent) || v_prefix || '? missing node ' || coalesce(v_id, 'null'));
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
        v_cfg := case when v_node ->> 't' in ('WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'BREAK', 'IF')
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
                coalesce(nullif(v_node -> 'x', 'null'::jsonb), '[]'::jsonb))) || ')'
            when 'RACE' then 'RACE'
            when 'THEN' then 'THEN'
            else coalesce(v_node ->> 't', '?') end
            || coalesce(' |=> ' || quote_literal(v_node ->> 'n'), '')
            -- per-node timings of a live instance: run time, and time queued before a worker
            -- picked it up (status_details: queued_at, started_at, finished_at, duration_ms)
            || coalesce(' (' || (v_node ->> 'd') || ' ms'
                        || case when (v_node ->> 'w')::numeric > 0
                                then ', queued ' || (v_node ->> 'w') || ' ms' else '' end
                        || ')', '');
        v_mark := case v_node ->> 'm'
            when 'completed' then '✓ ' when 'failed' then '✗ ' when 'running' then '⏳ '
            when 'pending' then '○ ' when 'skipped' then '⊘ ' else '' end;
        v_lines := v_lines || (repeat(' ', v_indent) || v_prefix || v_mark || v_label);
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
                                 coalesce(nullif(v_node -> 'x', 'null'::jsonb), '[]'::jsonb))), '{}');
                v_roles := array(select 'branch ' || g || ': ' from generate_series(1, cardinality(v_kids)) g);
            when 'RACE' then
                v_kids := array[v_node ->> 'l', v_node ->> 'r'];
                v_roles := array['branch 1: ', 'branch 2: '];
            when 'THEN' then
                v_kids := array[v_node ->> 'l', v_node ->> 'r'];
                v_roles := array['', '→ '];
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
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_inst  record;
    v_nodes jsonb;
    v_text  text := input;
    v_row   record;
    v_flat  jsonb;
begin
    if input is null then
        return null;
    end if;
    if input ~ '^[0-9a-f]{8}$' then
        select i.id, i.status, i.root_node,
               (select r.result::text from df.nodes r where r.instance_id = i.id and r.id = i.root_node) as output
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
                                  (n.status_details ->> 'started_at')::timestamptz
                                  - (n.status_details ->> 'queued_at')::timestamptz)) end,
                   'c', case when n.node_type in ('IF', 'LOOP') then df._try_jsonb(n.query) ->> 'condition_node' end,
                   'x', case when n.node_type = 'JOIN' then df._try_jsonb(n.query) -> 'extra_nodes' end))
        into v_nodes
        from df.nodes n join df._node_tree(input) t on t.node_id = n.id
        where n.instance_id = input;
        return format(e'Instance: %s\nStatus: %s\nOutput: %s\n\n', v_inst.id, v_inst.status,
                      coalesce(v_inst.output, '(none)'))
               || df._explain_render(coalesce(v_nodes, '{}'), v_inst.root_node);
    end if;

    -- dry run: DSL text is evaluated (as the caller, like typing SELECT <input>); graph JSON
    -- and plain SQL go straight to the validator (plain SQL auto-wraps into one SQL node)
    if input !~ '^\s*\{'
       and (input ~* '\mdf\s*\.\s*(sql|seq|as|join|join3|race|if|if_rows|loop|break|sleep|wait_for_schedule|wait_for_signal|http|http_multipart)\s*\('
            or input ~ '~>|\|=>|\?>|!>|^\s*@>') then
        -- through a cursor: PostgreSQL refuses to open a multi-statement string as one, so
        -- `x); <another statement>; select (y` cannot smuggle extra statements into a dry run
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
        return 'Invalid durable function graph: root: ' || sqlerrm;
    end;
    select jsonb_object_agg(n.id, jsonb_build_object(
               't', n.node_type, 'q', n.query, 'n', n.result_name, 'l', n.left_node, 'r', n.right_node,
               'c', case when n.node_type in ('IF', 'LOOP') then df._try_jsonb(n.query) ->> 'condition_node' end,
               'x', case when n.node_type = 'JOIN' then df._try_jsonb(n.query) -> 'extra_nodes' end))
    into v_nodes
    from jsonb_to_recordset(v_flat) as n(id text, node_type text, query text, result_name text,
                                         left_node text, right_node text);
    return format(e'Dry run (not started): %s nodes\n\n', jsonb_array_length(v_flat))
           || df._explain_render(v_nodes, v_flat -> 0 ->> 'id');
end;
$$;

------------------------------------------------------------------------------------------
-- vars (per owner, RLS-scoped; frozen into an instance at df.start)
------------------------------------------------------------------------------------------

create function df.setvar(name text, value text) returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
begin
    if @engine@.in_workflow() then
        raise exception 'df.setvar cannot be called inside a workflow' using errcode = '0A000';
    end if;
    if coalesce(name, '') = '' then
        raise exception 'df.setvar: name must be non-empty' using errcode = '22023';
    end if;
    insert into df.vars as v (name, value, owner)
    values (setvar.name, setvar.value, quote_ident(current_user)::regrole)
    on conflict on constraint vars_pkey do update set value = excluded.value;
    return 'OK';
end;
$$;

create function df.getvar(name text) returns text
language sql stable
set search_path = pg_catalog
as $$ select v.value from df.vars v where v.name = $1 and v.owner = quote_ident(current_user)::regrole $$;

create function df.unsetvar(name text) returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
begin
    if @engine@.in_workflow() then
        raise exception 'df.unsetvar cannot be called inside a workflow' using errcode = '0A000';
    end if;
    delete from df.vars v where v.name = unsetvar.name and v.owner = quote_ident(current_user)::regrole;
    return 'OK';
end;
$$;

create function df.clearvars() returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
begin
    if @engine@.in_workflow() then
        raise exception 'df.clearvars cannot be called inside a workflow' using errcode = '0A000';
    end if;
    delete from df.vars v where v.owner = quote_ident(current_user)::regrole;
    return 'OK';
end;
$$;

------------------------------------------------------------------------------------------
-- misc
------------------------------------------------------------------------------------------

create function df.version() returns text
language sql immutable
set search_path = pg_catalog
as $$ select '@version@ (df API 0.2.6)'::text $$;

-- The original's manual trigger; pgdurable's service picks work up by itself.
create function df.run(instance_id text default null) returns void
language sql volatile
set search_path = pg_catalog
as $$ select $$;

-- The database holding df and the engine (pg_durable.database in the original): this one.
create function df.target_database() returns text
language sql stable
set search_path = pg_catalog
as $$ select current_database()::text $$;

create function df.duroxide_schema() returns text
language sql immutable
set search_path = pg_catalog
as $$ select '@engine@'::text $$;

-- The live service processes; a view (owner's rights) so users need no engine privilege.
create view df.workers as
    select w.host, w.pid, w.kind, w.version, w.started_at, w.last_seen_at, w.in_flight
    from @engine@.workers w;

------------------------------------------------------------------------------------------
-- grants
------------------------------------------------------------------------------------------

-- SPEC §4: additive, SECURITY INVOKER (the caller must hold what it hands out). Besides the
-- df grants, the role gets USAGE on the engine schema and EXECUTE on the engine helpers the
-- df functions call (they are SECURITY DEFINER and check ownership themselves).
create function df.grant_usage(p_role text, include_http boolean default false,
                               with_grant boolean default false)
returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_opt text := case when with_grant then ' with grant option' else '' end;
    v_fn  text;
begin
    if p_role is null or not exists (select 1 from pg_roles r where r.rolname = p_role) then
        raise exception 'role "%" does not exist', p_role using errcode = '42704';
    end if;
    execute format('grant usage on schema df to %I%s', p_role, v_opt);
    execute format('grant select on df.instances, df.nodes, df.workers to %I%s', p_role, v_opt);
    execute format('grant update (status, updated_at) on df.instances to %I%s', p_role, v_opt);
    execute format('grant insert (id, label, root_node, submitted_by, database) on df.instances to %I%s',
                   p_role, v_opt);
    execute format('grant insert (id, instance_id, node_type, query, result_name, left_node, right_node, '
                   'submitted_by, database) on df.nodes to %I%s', p_role, v_opt);
    execute format('grant select, insert, update, delete on df.vars to %I%s', p_role, v_opt);
    execute format('grant usage on schema @engine@ to %I%s', p_role, v_opt);
    foreach v_fn in array array[
        '@engine@.setting(text,text)', '@engine@.clock()', '@engine@.in_workflow()',
        '@engine@._schema_ready_v1()', '@engine@._enqueue_v1(varchar,jsonb)',
        '@engine@._signal_v1(varchar,text,jsonb)', '@engine@._cancel_v1(varchar,text)',
        '@engine@._new_start_v1(name,text,text,text)'] loop
        execute format('grant execute on function %s to %I%s', v_fn::regprocedure, p_role, v_opt);
    end loop;
    if include_http then
        -- defined by 10_dsl.sql
        foreach v_fn in array array['df.http(text,text,text,jsonb,integer)',
                                    'df.http_multipart(text,text,jsonb,jsonb,integer)'] loop
            if to_regprocedure(v_fn) is not null then
                execute format('grant execute on function %s to %I%s', v_fn::regprocedure, p_role, v_opt);
            end if;
        end loop;
    end if;
    if with_grant then
        execute format('grant execute on function df.grant_usage(text,boolean,boolean), '
                       'df.revoke_usage(text), df.metrics() to %I with grant option', p_role);
    end if;
    return 'OK';
end;
$$;

-- The mirror of df.grant_usage; CASCADE also removes what the role handed on.
create function df.revoke_usage(p_role text) returns text
language plpgsql volatile
set search_path = pg_catalog
as $$
declare
    v_fn text;
begin
    if p_role is null or not exists (select 1 from pg_roles r where r.rolname = p_role) then
        raise exception 'role "%" does not exist', p_role using errcode = '42704';
    end if;
    -- REVOKE ALL on a table also revokes the column privileges
    execute format('revoke all on df.instances, df.nodes, df.vars, df.workers from %I cascade', p_role);
    foreach v_fn in array array[
        '@engine@.setting(text,text)', '@engine@.clock()', '@engine@.in_workflow()',
        '@engine@._schema_ready_v1()', '@engine@._enqueue_v1(varchar,jsonb)',
        '@engine@._signal_v1(varchar,text,jsonb)', '@engine@._cancel_v1(varchar,text)',
        '@engine@._new_start_v1(name,text,text,text)', 'df.grant_usage(text,boolean,boolean)',
        'df.revoke_usage(text)', 'df.metrics()', 'df.http(text,text,text,jsonb,integer)',
        'df.http_multipart(text,text,jsonb,jsonb,integer)'] loop
        if to_regprocedure(v_fn) is not null then
            execute format('revoke all on function %s from %I cascade', v_fn::regprocedure, p_role);
        end if;
    end loop;
    execute format('revoke all on schema @engine@ from %I cascade', p_role);
    execute format('revoke all on schema df from %I cascade', p_role);
    return 'OK';
end;
$$;
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
-- `serve` processes never wait on each other, and never take more than the free slots.
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
        -- "take": the successor is handed straight to a free slot of this worker (docs/performance.md.5):
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
    with upd as (
        update @engine@.tasks t
        set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
        from unnest(p_instances, p_nodes) as k(instance_id, node_id)
        where t.lease_owner = p_owner
          and t.instance_id = k.instance_id and t.node_id = k.node_id
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

-- Caps on connections running step SQL (docs/decisions.md D13), each slot a transaction-scoped advisory
-- lock taken inside the step's own transaction, so the commit/rollback that ends the step
-- releases it — even when the worker dies:
--   pg_durable.max_user_connections (default 10): deployment-wide, class 'PGDU';
--   pg_durable.max_connections_per_role (default 0 = no per-role cap): per submitting role,
--     so one tenant cannot take every slot.
-- Polls every 50 ms up to pg_durable.execution_acquire_timeout seconds, then fails the step.
create function @engine@._step_slot_v1(p_role oid)
returns integer
language plpgsql volatile
set search_path = pg_catalog
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
        perform pg_sleep(0.05);
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
-- pgdurable schema, part 90: privileges (SPEC §4 "Grants"), applied after every other part.
--
-- The model: schema USAGE on df is the gate (df.grant_usage hands it out with the table and
-- column grants); ordinary df functions keep PUBLIC EXECUTE so a granted role needs nothing
-- more; the sensitive ones (HTTP, metrics, the grant helpers) are granted explicitly. The
-- engine schemas are private: no PUBLIC access at all; df.grant_usage gives a role EXECUTE on
-- the few SECURITY DEFINER helpers the df functions call.

revoke all on schema df from public;
revoke all on all tables in schema df from public;
revoke all on all sequences in schema df from public;
revoke all on all functions in schema df from public;

-- ordinary df functions: PUBLIC EXECUTE (USAGE on df is still required to reach them)
grant execute on all functions in schema df to public;
do $$
declare
    v_fn text;
begin
    foreach v_fn in array array['df.http(text,text,text,jsonb,integer)',
                                'df.http_multipart(text,text,jsonb,jsonb,integer)',
                                'df.metrics()', 'df.grant_usage(text,boolean,boolean)',
                                'df.revoke_usage(text)'] loop
        -- the HTTP functions come from 10_dsl.sql; tolerate their absence while it is written
        if to_regprocedure(v_fn) is not null then
            execute format('revoke execute on function %s from public', to_regprocedure(v_fn));
        end if;
    end loop;
end;
$$;

revoke all on schema @engine@ from public;
revoke all on all tables in schema @engine@ from public;
revoke all on all sequences in schema @engine@ from public;
revoke all on all functions in schema @engine@ from public;
revoke all on schema @engine@_exec from public;
revoke all on all functions in schema @engine@_exec from public;
