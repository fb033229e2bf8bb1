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

-- The schemas df, @engine@ and @engine@_exec are created by pgdurable install (schema.py),
-- owned by pgdurable_owner, before this file runs as that role. @engine@_exec holds the
-- per-role step runners (docs/security.md): nobody but the engine can even name it, so a
-- tenant owns its runner but cannot ALTER it.

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
    -- df.start(…, idempotency_key => k): one instance per role and key (not in pg_durable)
    idempotency_key text,
    constraint instances_id_format check (id ~ '^[0-9a-f]{8}$') not valid,
    constraint instances_status_check
        check (status in ('pending', 'running', 'completed', 'failed', 'cancelled')) not valid,
    constraint instances_id_submitted_by_key unique (id, submitted_by)
);
create index instances_status_created_idx on df.instances (status, created_at desc, id);
create index instances_created_idx on df.instances (created_at desc, id);
create index instances_label_idx on df.instances (label, created_at desc, id) where label is not null;
create unique index instances_idempotency_idx on df.instances (submitted_by, idempotency_key)
    where idempotency_key is not null;

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
    owner regrole not null default quote_ident(current_user)::regrole,
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

-- Step capabilities (docs/security.md, "The step session"). A worker registers one random
-- token per step connection, keyed by that connection's backend pid; only its SHA-256 is
-- stored. The token reaches the step session solely as a bind parameter of the worker's own
-- calls, so tenant code in that session (including code PostgreSQL runs at COMMIT, as the
-- unprivileged step role) never sees it. The runners and every step_* engine function refuse
-- a call without it: escaped code can call nothing useful.
create table @engine@.step_caps (
    pid        integer     not null primary key,
    token_hash bytea       not null,
    worker_id  text        not null,
    created_at timestamptz not null default now()
);

-- Step slots (docs/decisions.md D13): a step transaction locks one row here until it ends. Rows, not
-- advisory locks: no role but the engine's owner may lock them (a tenant cannot name them).
create table @engine@.step_slots (
    slot integer not null primary key
);
create table @engine@.role_slots (
    role oid     not null,
    slot integer not null,
    primary key (role, slot)
);

-- Named engine mutexes taken with FOR UPDATE SKIP LOCKED (prune, 'new'-mode launch slots).
create table @engine@.locks (
    name text not null primary key
);
insert into @engine@.locks (name) values ('prune');
insert into @engine@.locks (name) select 'launch:' || g from generate_series(0, 15) g;

-- transaction_mode 'new' (df.start in a session of its own, committed whatever the caller
-- does): the login the engine's dblink session uses. A LOGIN role per install, member of
-- nothing, allowed to call only @engine@._launch_v1; its random password lives here, readable
-- by the engine's owner alone (dblink lets a non-superuser connect only with a password the
-- server asks for). Filled by pgdurable install.
create table @engine@.launcher (
    sentinel boolean not null primary key default true check (sentinel),
    rolname  name    not null,
    password text    not null
);

-- Which role a step transaction runs for (docs/decisions.md D5). The worker writes its row inside the
-- step's own transaction (through the token-gated @engine@._step_begin_v1), keyed by backend
-- pid and stamped with that transaction's id, so @engine@._invoker() inside an engine helper
-- called from a step identifies the step's role (session_user there is the step role).
-- Unforgeable: tenants cannot write this table, and a stale row never matches another
-- transaction's id.
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
-- ALTER DATABASE/ALTER SYSTEM/SET work without an extension (SPEC §1). Where each one is read
-- (docs/operating.md, "Settings"):
--   @engine@.setting     in the caller's session, by the df.* functions it calls: what that
--                        session sees (SET, ALTER ROLE … SET, ALTER DATABASE … SET as of when
--                        it connected, postgresql.conf)
--   @engine@.setting_db  by the engine, on behalf of the whole deployment (step slots,
--                        retention, the worker's limits): the database's own default, read
--                        fresh, else the server's value; never a tenant's
--   @engine@._role_setting_v1 / _role_settings_v1: a role's own values, which apply inside
--                        its steps and may only tighten the engine's limits
create function @engine@.setting(p_name text, p_default text) returns text
language sql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select coalesce(nullif(pg_catalog.current_setting('pg_durable.' || p_name, true), ''), p_default) $$;

-- A deployment-wide setting: the database's own default (ALTER DATABASE … SET), read from the
-- catalog on every call so a change applies within seconds, without anyone reconnecting;
-- else the server's value (postgresql.conf / ALTER SYSTEM, reloaded by PostgreSQL); else
-- p_default. The engine calls it only in its own sessions, where nothing SETs pg_durable.*
-- (a step session is RESET before each step, and reads it before the step's statement), so
-- no tenant's SET or ALTER ROLE … SET reaches it. A session keeps a database default it
-- connected with after ALTER DATABASE … RESET: the worker recycles its sessions when it sees
-- one go (pgdurable/worker/process.py, _load_settings).
create function @engine@.setting_db(p_name text, p_default text) returns text
language sql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(
        (select nullif(pg_catalog.substr(c.item, pg_catalog.strpos(c.item, '=') operator(pg_catalog.+) 1), '')
         from pg_catalog.pg_db_role_setting s
         cross join lateral pg_catalog.unnest(s.setconfig) as c(item)
         where s.setrole operator(pg_catalog.=) 0::pg_catalog.oid
           and s.setdatabase operator(pg_catalog.=)
               (select d.oid from pg_catalog.pg_database d
                where d.datname operator(pg_catalog.=) pg_catalog.current_database())
           and pg_catalog.lower(pg_catalog.split_part(c.item, '=', 1)) operator(pg_catalog.=)
               pg_catalog.lower('pg_durable.' operator(pg_catalog.||) p_name)
         limit 1),
        nullif(pg_catalog.current_setting('pg_durable.' operator(pg_catalog.||) p_name, true), ''),
        p_default)
$$;

-- An integer setting's value, or an error naming the setting (p_name: pg_durable.<name>, or
-- "pg_durable.<name> of role <role>").
create function @engine@._setting_int_v1(p_name text, p_value text) returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_value operator(pg_catalog.~) '^\s*[-+]?[0-9]{1,9}\s*$' then
        return p_value::pg_catalog.int4;
    end if;
    raise exception '% is %, not an integer', p_name, pg_catalog.quote_literal(p_value)
        using errcode = '22023', hint = 'set it to a whole number, or RESET it';
end
$$;

-- A role's own value of a setting, as a session of the role in this database gets it from
-- ALTER ROLE … IN DATABASE … SET (first) or ALTER ROLE … SET; NULL when it has none. Catalog
-- only: nothing a session SETs.
create function @engine@._role_setting_v1(p_role oid, p_name text) returns text
language sql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.substr(c.item, pg_catalog.strpos(c.item, '=') operator(pg_catalog.+) 1)
    from pg_catalog.pg_db_role_setting s
    cross join lateral pg_catalog.unnest(s.setconfig) as c(item)
    where s.setrole operator(pg_catalog.=) p_role
      and s.setdatabase operator(pg_catalog.=) any (array[0::pg_catalog.oid,
              (select d.oid from pg_catalog.pg_database d
               where d.datname operator(pg_catalog.=) pg_catalog.current_database())])
      and pg_catalog.lower(pg_catalog.split_part(c.item, '=', 1)) operator(pg_catalog.=)
          pg_catalog.lower(p_name)
    order by s.setdatabase operator(pg_catalog.=) 0::pg_catalog.oid  -- this database first
    limit 1
$$;

-- The settings a role's ALTER ROLE … SET cannot bring into its steps (docs/operating.md,
-- "Settings"; docs/security.md): who runs the statement (role, session_authorization: the
-- runner decides), the engine's connection and transaction (client_encoding,
-- application_name, which names each step; transaction_* and default_transaction_*: the step's
-- transaction is begun by the engine, read-write, and carries its checkpoint;
-- idle_in_transaction_session_timeout would end the session while it checkpoints), and every
-- df.*, pgdurable.* and pg_durable.* name (engine-internal, or the engine's limits, which a
-- role may only tighten: statement_timeout and the pg_durable.* limits are combined in
-- _role_settings_v1 and the worker, not applied as they are).
create function @engine@._setting_pinned_v1(p_name text) returns boolean
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select pg_catalog.lower(p_name) operator(pg_catalog.=) any (array[
               'role', 'session_authorization', 'client_encoding', 'application_name',
               'idle_in_transaction_session_timeout', 'statement_timeout'])
        or pg_catalog.lower(p_name) operator(pg_catalog.~)
               '^(transaction_|default_transaction_|df\.|pgdurable\.|pg_durable\.)'
$$;

-- A duration setting in milliseconds, parsed as PostgreSQL parses statement_timeout (a bare
-- number is milliseconds; us, ms, s, min, h, d), or an error naming the setting (p_what).
create function @engine@._timeout_ms_v1(p_value text, p_what text) returns bigint
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_m    pg_catalog.text[];
    v_norm pg_catalog.text;
    v_old  pg_catalog.text;
begin
    if p_value is null or pg_catalog.btrim(p_value) operator(pg_catalog.=) '' then
        return null;
    end if;
    v_m := pg_catalog.regexp_match(p_value, '^\s*(0|[1-9][0-9]{0,9})\s*(ms|s|min|h|d)?\s*$');
    if v_m is null then
        -- anything else PostgreSQL accepts (1.5s, 100us, …): its own parser, then put back
        v_old := pg_catalog.current_setting('statement_timeout');
        begin
            v_norm := pg_catalog.set_config('statement_timeout', p_value, true);
        exception when others then
            raise exception '% is %, not a duration', p_what, pg_catalog.quote_literal(p_value)
                using errcode = '22023',
                      hint = 'give milliseconds or a number with a unit: 500ms, 30s, 5min';
        end;
        perform pg_catalog.set_config('statement_timeout', v_old, true);
        v_m := pg_catalog.regexp_match(v_norm, '^([0-9]+)(ms|s|min|h|d)?$');
    end if;
    return v_m[1]::pg_catalog.int8 operator(pg_catalog.*)
           case v_m[2] when 's' then 1000 when 'min' then 60000 when 'h' then 3600000
                       when 'd' then 86400000 else 1 end;
end
$$;

-- What a step of p_role runs with, applied at the start of every step transaction (the step
-- queries step_settings / step_next / remote_step_settings, pgdurable/sql/queries.sql): a
-- session of the role would have its ALTER ROLE … IN DATABASE … SET, ALTER ROLE … SET,
-- ALTER DATABASE … SET and ALTER ROLE ALL … SET values (the more specific wins), read fresh
-- here. Every one but the pinned names (_setting_pinned_v1) is applied with SET LOCAL
-- semantics, except search_path, returned for the caller's query to apply (this function's
-- own pinned search_path would undo it at return). One the step session may not set (a
-- superuser-only parameter, one fixed at connection start) or no longer valid is skipped,
-- as PostgreSQL skips it at login with a warning.
-- statement_timeout is returned as the engine's limit, tightened by the role: the shortest
-- non-zero of the deployment's pg_durable.step_statement_timeout (p_step_timeout, or
-- setting_db when NULL), the role's own pg_durable.step_statement_timeout and the
-- statement_timeout a session of the role would have; '0' when none is set. A role can
-- shorten its steps' limit, never lengthen it.
create function @engine@._role_settings_v1(p_role oid, p_step_timeout text)
returns table (search_path text, statement_timeout text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    r          record;
    v_db       pg_catalog.oid := (select d.oid from pg_catalog.pg_database d
                                  where d.datname operator(pg_catalog.=) pg_catalog.current_database());
    v_who      pg_catalog.text := p_role::pg_catalog.regrole::pg_catalog.text;
    v_path     pg_catalog.text;
    v_timeout  pg_catalog.text;
    v_ms       pg_catalog.int8;
    v_best     pg_catalog.int8 := 0;
begin
    for r in
        select distinct on (x.name) x.name, x.value
        from (select pg_catalog.lower(pg_catalog.split_part(c.item, '=', 1)) as name,
                     pg_catalog.substr(c.item, pg_catalog.strpos(c.item, '=') operator(pg_catalog.+) 1) as value,
                     (s.setrole operator(pg_catalog.=) 0::pg_catalog.oid)::pg_catalog.int4 operator(pg_catalog.*) 2
                     operator(pg_catalog.+) (s.setdatabase operator(pg_catalog.=) 0::pg_catalog.oid)::pg_catalog.int4 as rank
              from pg_catalog.pg_db_role_setting s
              cross join lateral pg_catalog.unnest(s.setconfig) as c(item)
              where s.setrole operator(pg_catalog.=) any (array[0::pg_catalog.oid, p_role])
                and s.setdatabase operator(pg_catalog.=) any (array[0::pg_catalog.oid, v_db])) x
        order by x.name, x.rank
    loop
        if r.name operator(pg_catalog.=) 'search_path' then
            v_path := r.value;
        elsif r.name operator(pg_catalog.=) 'statement_timeout' then
            v_timeout := r.value;
        elsif not @engine@._setting_pinned_v1(r.name) then
            begin
                perform pg_catalog.set_config(r.name, r.value, true);
            exception when others then
                null;
            end;
        end if;
    end loop;
    foreach v_ms in array array[
        @engine@._timeout_ms_v1(coalesce(p_step_timeout,
                                         @engine@.setting_db('step_statement_timeout', '0')),
                                'pg_durable.step_statement_timeout'),
        @engine@._timeout_ms_v1(@engine@._role_setting_v1(p_role, 'pg_durable.step_statement_timeout'),
                                'pg_durable.step_statement_timeout of role ' operator(pg_catalog.||) v_who),
        @engine@._timeout_ms_v1(v_timeout, 'statement_timeout of role ' operator(pg_catalog.||) v_who)]
    loop
        if v_ms operator(pg_catalog.>) 0
           and (v_best operator(pg_catalog.=) 0 or v_ms operator(pg_catalog.<) v_best) then
            v_best := v_ms;
        end if;
    end loop;
    -- statement_timeout's own ceiling (INT_MAX milliseconds, some 24 days)
    return query select v_path, least(v_best, 2147483647)::pg_catalog.text;
end
$$;

-- The clock every df function and engine query uses for due times. Tests control it
-- (STYLE B16): pg_durable.fake_now pins it (SQL tests), pg_durable.clock_offset shifts a
-- running clock (acceptance tests of cron schedules: ALTER DATABASE … SET before serve
-- starts). Production sets neither.
create function @engine@.clock() returns timestamptz
language sql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select coalesce(nullif(pg_catalog.current_setting('pg_durable.fake_now', true), '')::pg_catalog.timestamptz,
                      pg_catalog.now())
             + coalesce(nullif(pg_catalog.current_setting('pg_durable.clock_offset', true), '')::pg_catalog.interval,
                        '0'::pg_catalog.interval) $$;

-- True inside a workflow step session (the worker sets df.in_workflow = 'true').
create function @engine@.in_workflow() returns boolean
language sql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select coalesce(pg_catalog.current_setting('df.in_workflow', true), '') = 'true' $$;
-- pgdurable schema, part 10: the DSL (SPEC §3, ARCHITECTURE §1).
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
set search_path = pg_catalog, pg_temp
as $$ select array['SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE', 'BREAK', 'SLEEP',
                   'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART'] $$;

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

-- Result names and if_rows names: SQL-identifier-like names (SPEC §2 result_name CHECK).
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

-- Build-time check of a cron expression (SPEC §3, D7). Only a syntax and range check: the
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

-- HTTP argument checks shared by df.http and df.http_multipart (SPEC §3.8, D12).
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

-- An HTTP request (SPEC §3.8). The allow-list/deny policy is the service's (D12), applied
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
-- (the fields of each part are checked when the node runs, SPEC §3.8).
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

-- Run condition (any node), then then_branch if its result is truthy (SPEC §3.4), else
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

-- `c ?> t`: the first half of an IF, a partial object only !> accepts (ARCHITECTURE §1).
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
-- The operand types name pg_catalog: they are resolved once, here, under the installing
-- session's search_path (where a temp type called text would otherwise come first).
-- None of the seven clashes with a pg_catalog operator on text (checked on PG 15 and 18;
-- tests/sql/test_operators.py keeps checking). & and | exist for integer, bit and inet
-- types; with two untyped literals ('…' & '…') PostgreSQL prefers the string category, so
-- these resolve to the text versions here.

create operator @opschema@.~> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.seq);
comment on operator @opschema@.~> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: a then b (df.seq)';

create operator @opschema@.|=> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.as_op);
comment on operator @opschema@.|=> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: name a result (df.as)';

create operator @opschema@.& (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df."join");
comment on operator @opschema@.& (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: run both, await all (df.join)';

create operator @opschema@.| (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.race);
comment on operator @opschema@.| (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: run both, first wins (df.race)';

create operator @opschema@.?> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.if_then_op);
comment on operator @opschema@.?> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: condition ?> then_branch, completed by !> (df.if_then_op)';

create operator @opschema@.!> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.if_else_op);
comment on operator @opschema@.!> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: (condition ?> then_branch) !> else_branch (df.if)';

create operator @opschema@.@> (rightarg = pg_catalog.text, function = df.loop_op);
comment on operator @opschema@.@> (none, pg_catalog.text)
    is 'pg_durable DSL: infinite loop (df.loop)';
-- pgdurable schema, part 30: control — df.start, df.signal, df.cancel, df.status, df.result,
-- df.error, df.await_instance (+ deprecated df.wait_for_completion), the graph validator and
-- flattener df.start uses (shared with df.explain), and the engine helpers they call.
--
--   df._graph_flatten(jsonb)   validate a graph value, return its node rows in pre-order
--   df._graph_value(text)      auto-wrap a df.start/df.explain argument into a graph jsonb
--   df.start                   SPEC §4 validation order, then instances + nodes + enqueue
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

-- Auto-wrap (SPEC §3): a JSON object with a node_type is a graph, a JSON object with a
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
                          'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART') then
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
            -- Hand-written configs get the same checks as the DSL builders (SPEC §5: df.start
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
                    -- it may start the graph and fails at run time (SPEC §3.8 gate 0)
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
            -- the worker runs JOINs of two or three branches (df.join, df.join3); a longer list
            -- would be stored and then fail every load of the instance
            if jsonb_array_length(case when jsonb_typeof(v_node #> '{c,extra_nodes}') = 'array'
                                       then v_node #> '{c,extra_nodes}' end) > 1 then
                raise exception 'a JOIN has at most three branches: extra_nodes holds at most one node (df.join3), got % (at %)',
                    jsonb_array_length(v_node #> '{c,extra_nodes}'), v_where using errcode = '22023';
            end if;
            if v_type in ('THEN', 'RACE', 'JOIN')
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
                                               'HTTP_MULTIPART')
                       then pg_catalog.format('node %L has an unknown node_type %L', x.id,
                                              x.node_type)
                   when x.submitted_by <> v_inst.submitted_by
                       then pg_catalog.format('node %L was submitted by %s, not by the '
                                              'instance''s role %s', x.id, x.submitted_by,
                                              v_inst.submitted_by)
                   when x.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE')
                        and (x.left_node is not null or x.right_node is not null)
                       then pg_catalog.format('node %L (%s): a leaf has no left_node/right_node',
                                              x.id, x.node_type)
                   when x.node_type not in ('THEN', 'IF', 'LOOP', 'JOIN', 'RACE') then null
                   when x.left_node is null
                       then pg_catalog.format('node %L (%s): left_node is missing', x.id,
                                              x.node_type)
                   when x.node_type = 'LOOP' and x.right_node is not null
                       then pg_catalog.format('node %L (LOOP): a LOOP has no right_node', x.id)
                   when x.node_type <> 'LOOP' and x.right_node is null
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

-- The root node's result, only for a completed instance (SPEC §4: not the error of a failed one).
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
-- pgdurable schema, part 35: catching a reference to a name no step defines, where it is
-- written (df.start, and the df.explain dry run), rather than as `syntax error at or near "$"`
-- when the step runs.
--
-- At run time a `$name` is replaced only when a step named `name` has produced a result;
-- anything else is left as written (pg_durable's rule), which PostgreSQL then reports as a
-- syntax error. A `$name` outside quotes and comments whose name no step of the workflow
-- defines can therefore never be replaced: df.start refuses it, naming it, the step, and the
-- names the workflow does define. Quoted text ('…', "…", $tag$…$tag$), comments and {var}
-- braces (replaced first, and a var's name may hold a $) are not looked at: a `$name` there is text that pgdurable may still replace (a defined name) or
-- leave (`'costs in $USD'`), both legitimate. `$1` (a parameter) is not a reference.
-- Only SQL steps are checked: HTTP urls and bodies are substituted in raw mode, where `$` is
-- ordinary text.

-- The `$name` references of a SQL text that sit outside quotes and comments, in order, once
-- each; with p_braces, the `{name}` references instead (a name that is an identifier). A
-- scanner, not a regular expression: dollar-quote tags must match their own end.
create function df._sql_refs(p_sql text, p_braces boolean default false) returns text[]
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $f$
declare
    v_len  pg_catalog.int4 := pg_catalog.length(p_sql);
    v_i    pg_catalog.int4 := 1;
    v_c    pg_catalog.text;
    v_tag  pg_catalog.text;
    v_end  pg_catalog.int4;
    v_name pg_catalog.text;
    v_out  pg_catalog.text[] := '{}';
begin
    if p_sql is null or (not p_braces and p_sql !~ '\$[A-Za-z_]')
       or (p_braces and p_sql !~ '\{[A-Za-z_][A-Za-z0-9_]*\}') then
        return v_out;
    end if;
    while v_i <= v_len loop
        v_c := pg_catalog.substr(p_sql, v_i, 1);
        if v_c = '''' then
            -- a string: '' inside it is a quote; E'…' also escapes with a backslash
            if v_i > 1 and pg_catalog.lower(pg_catalog.substr(p_sql, v_i - 1, 1)) = 'e' then
                v_end := v_i + 1;
                while v_end <= v_len loop
                    v_c := pg_catalog.substr(p_sql, v_end, 1);
                    exit when v_c = '''' and pg_catalog.substr(p_sql, v_end + 1, 1) <> '''';
                    v_end := v_end + case when v_c in ('\', '''') then 2 else 1 end;
                end loop;
            else
                v_end := v_i + 1;
                loop
                    v_tag := pg_catalog.strpos(pg_catalog.substr(p_sql, v_end), '''')::pg_catalog.text;
                    if v_tag = '0' then
                        v_end := v_len;  -- unterminated: the rest is the string
                        exit;
                    end if;
                    v_end := v_end + v_tag::pg_catalog.int4 - 1;  -- at a quote
                    exit when pg_catalog.substr(p_sql, v_end + 1, 1) <> '''';
                    v_end := v_end + 2;  -- '' inside the string
                end loop;
            end if;
            v_i := v_end + 1;
        elsif v_c = '"' then
            v_end := pg_catalog.strpos(pg_catalog.substr(p_sql, v_i + 1), '"');
            v_i := case when v_end = 0 then v_len + 1 else v_i + v_end + 1 end;
        elsif v_c = '{' and pg_catalog.substr(p_sql, v_i + 1) ~ '^[^{}]+\}' then
            -- {var}: replaced before any $name is (a var's name may hold a $)
            v_end := pg_catalog.strpos(pg_catalog.substr(p_sql, v_i), '}');
            v_name := pg_catalog.substr(p_sql, v_i + 1, v_end - 2);
            if p_braces and v_name ~ '^[A-Za-z_][A-Za-z0-9_]*$' and not v_name = any (v_out) then
                v_out := v_out || v_name;
            end if;
            v_i := v_i + v_end;
        elsif v_c = '-' and pg_catalog.substr(p_sql, v_i + 1, 1) = '-' then
            v_end := pg_catalog.strpos(pg_catalog.substr(p_sql, v_i), pg_catalog.chr(10));
            v_i := case when v_end = 0 then v_len + 1 else v_i + v_end end;
        elsif v_c = '/' and pg_catalog.substr(p_sql, v_i + 1, 1) = '*' then
            v_end := pg_catalog.strpos(pg_catalog.substr(p_sql, v_i + 2), '*/');
            v_i := case when v_end = 0 then v_len + 1 else v_i + v_end + 3 end;
        elsif v_c = '$' then
            v_tag := pg_catalog.substring(pg_catalog.substr(p_sql, v_i), '^\$([A-Za-z_][A-Za-z0-9_]*)?\$');
            if v_tag is not null or pg_catalog.substr(p_sql, v_i, 2) = '$$' then
                -- a dollar-quoted body: skip to its closing tag
                v_tag := '$' || coalesce(v_tag, '') || '$';
                v_end := pg_catalog.strpos(pg_catalog.substr(p_sql, v_i + pg_catalog.length(v_tag)), v_tag);
                v_i := case when v_end = 0 then v_len + 1
                            else v_i + pg_catalog.length(v_tag) + v_end - 1 + pg_catalog.length(v_tag) end;
            else
                v_name := pg_catalog.substring(pg_catalog.substr(p_sql, v_i + 1), '^[A-Za-z_][A-Za-z0-9_]*');
                if v_name is not null and not p_braces then
                    -- PostgreSQL's identifier characters include $: `$a$b` is no reference to a
                    if pg_catalog.substr(p_sql, v_i + 1 + pg_catalog.length(v_name), 1) <> '$'
                       and not v_name = any (v_out) then
                        v_out := v_out || v_name;
                    end if;
                    v_i := v_i + 1 + pg_catalog.length(v_name);
                else
                    v_i := v_i + 1;
                end if;
            end if;
        elsif v_c ~ '[A-Za-z0-9_]' then
            -- an identifier or number: a `$` inside one (`a$b`) starts no reference
            v_end := pg_catalog.length(pg_catalog.substring(pg_catalog.substr(p_sql, v_i),
                                                            '^[A-Za-z0-9_$]+'));
            v_i := v_i + v_end;
        else
            v_i := v_i + 1;
        end if;
    end loop;
    return v_out;
end;
$f$;

-- Refuse a graph (df._graph_flatten's node rows) whose SQL steps refer to a name no step of it
-- defines. 22023, as the other graph errors.
create function df._check_refs(p_nodes jsonb) returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_names pg_catalog.text[];
    v_node  pg_catalog.jsonb;
    v_ref   pg_catalog.text;
begin
    select coalesce(pg_catalog.array_agg(distinct n ->> 'result_name' order by n ->> 'result_name'), '{}')
    into v_names
    from pg_catalog.jsonb_array_elements(p_nodes) n
    where n ->> 'result_name' is not null;
    for v_node in select n from pg_catalog.jsonb_array_elements(p_nodes) n
                  where n ->> 'node_type' = 'SQL' and n ->> 'query' ~ '\$[A-Za-z_]' loop
        foreach v_ref in array df._sql_refs(v_node ->> 'query') loop
            if not v_ref = any (v_names) then
                raise exception 'unknown reference $% in step %: no step of this workflow is named % (%)',
                    v_ref, pg_catalog.quote_literal(pg_catalog.left(v_node ->> 'query', 200)),
                    pg_catalog.quote_literal(v_ref),
                    case when pg_catalog.cardinality(v_names) operator(pg_catalog.=) 0
                         then 'it names no step: name one with |=> ''name'''
                         else 'its names: ' || pg_catalog.array_to_string(v_names, ', ') end
                    using errcode = '22023',
                          hint = 'a $ that is not a reference belongs inside quotes: ''$' || v_ref || '''';
            end if;
        end loop;
    end loop;
end;
$$;

-- Refuse a graph whose SQL steps name a `{var}` that is neither a variable of the starting
-- role's snapshot (df.setvar) nor {sys_instance_id} / {sys_label}: left as written, it could
-- only become a syntax error. Called by df.start once the snapshot is taken.
create function df._check_vars(p_nodes jsonb, p_vars jsonb) returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_node pg_catalog.jsonb;
    v_ref  pg_catalog.text;
    v_names pg_catalog.text;
begin
    for v_node in select n from pg_catalog.jsonb_array_elements(p_nodes) n
                  where n ->> 'node_type' = 'SQL' and n ->> 'query' ~ '\{[A-Za-z_]' loop
        foreach v_ref in array df._sql_refs(v_node ->> 'query', true) loop
            if v_ref not in ('sys_instance_id', 'sys_label') and not p_vars ? v_ref then
                select pg_catalog.string_agg(k, ', ' order by k) into v_names
                from pg_catalog.jsonb_object_keys(p_vars) k;
                raise exception 'unknown variable {%} in step %: df.setvar has not set %',
                    v_ref, pg_catalog.quote_literal(pg_catalog.left(v_node ->> 'query', 200)),
                    pg_catalog.quote_literal(v_ref)
                    using errcode = '22023',
                          hint = 'your variables: ' || coalesce(v_names, '(none)')
                                 || '; and {sys_instance_id}, {sys_label}';
            end if;
        end loop;
    end loop;
end;
$$;
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
-- Our choices where SPEC §4 leaves room (documented in docs too):
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
--   superseded  a node under a LOOP whose seq < that loop's iter_seq reads as pending
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
               case when x.node_type = 'LOOP' and jsonb_typeof(x.status_details -> 'iter_seq') = 'number'
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
                                    when 'THEN' then 'first' else 'branch 1' end,
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
           (n.status_details - 'result_from' - 'result_of' - 'result_bytes')::pg_catalog.text,
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
                coalesce(nullif(v_node -> 'x', 'null'::pg_catalog.jsonb), '[]'::pg_catalog.jsonb))) || ')'
            when 'RACE' then 'RACE'
            when 'THEN' then 'THEN'
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
                   'x', case when n.node_type = 'JOIN' then df._try_jsonb(n.query) -> 'extra_nodes' end))
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
       and (input ~* '\mdf\s*\.\s*(sql|seq|as|join|join3|race|if|if_rows|loop|break|sleep|wait_for_schedule|wait_for_signal|http|http_multipart)\s*\('
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
    '@engine@._vars_v1(text,text,text)']::pg_catalog.text[] $$;

-- Additive, SECURITY INVOKER (the caller must hold what it hands out). Besides the
-- df grants, the role gets USAGE on the engine schema and EXECUTE on the engine helpers the
-- df functions call (they are SECURITY DEFINER and check ownership themselves). Tenants get
-- SELECT on df.vars, not INSERT/UPDATE/DELETE: df.setvar/unsetvar/clearvars write it, and
-- table-level DML would let any tenant LOCK the shared table and stall every df.start.
--
-- Then the role's step runner (50_engine.sql): a SECURITY DEFINER function owned by the role
-- in @engine@_exec. Only a role that can act as the tenant can make a function it owns, so
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
    if not @engine@._runner_ok_v1(v_oid) then
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
        execute pg_catalog.format('grant create on schema @engine@_exec to %I', p_role);
        v_ddl := @engine@._runner_ddl_v1(v_oid::pg_catalog.regrole, '@engine@_exec');
        execute pg_catalog.format('set local role %I', p_role);
        execute v_ddl;
        reset role;
        -- as the administrator, which can act as the role (the function's owner)
        execute pg_catalog.format('revoke all on function @engine@_exec.%I(pg_catalog.text, pg_catalog.text, pg_catalog.int8) from public',
                                  'step_' || v_oid::pg_catalog.text);
        execute pg_catalog.format('grant execute on function @engine@_exec.%I(pg_catalog.text, pg_catalog.text, pg_catalog.int8) to pgdurable_step',
                                  'step_' || v_oid::pg_catalog.text);
        execute pg_catalog.format('revoke create on schema @engine@_exec from %I', p_role);
        if not @engine@._runner_ok_v1(v_oid) then
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
-- pgdurable schema, part 50: the worker protocol (STYLE B4: every function a worker calls has
-- a _vN suffix so two service versions can share a database during a rolling deploy).
--
--   _claim_v1      lease up to N runnable tasks (FOR UPDATE SKIP LOCKED)
--   _apply_v1      one checkpoint: fence, node writes, successor tasks, instance status, state
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
set search_path = pg_catalog, pg_temp
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
          -- a task of an instance its owner marked terminal (tenants may UPDATE status) is
          -- never claimed; the rescuer deletes it
          and not exists (select 1 from df.instances i
                          where i.id = t.instance_id
                            and i.status in ('completed', 'failed', 'cancelled'))
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

-- Retention (SPEC §5): terminal instances older than pg_durable.retention_days are pruned in
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
-- role as the worker must check it before starting the instance (SPEC §9); last the role's
-- own pg_durable.loop_min_interval_ms / loop_max_iterations (ALTER ROLE … SET, as text, NULL
-- when it has none): the worker combines them with the deployment's, a role's value only
-- tightening them (pgdurable/worker/instance.py, loop_limits).
create function @engine@._load_instance_v1(p_instance varchar)
returns table (label text, status text, role_oid oid, role_text text, database text,
               root_node varchar, vars jsonb, state bytea, state_version bigint,
               cancel_reason text, rolname name, rolsuper boolean, rolcanlogin boolean,
               superuser_ok boolean, role_loop_min_interval_ms text,
               role_loop_max_iterations text)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
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
    where i.id operator(pg_catalog.=) p_instance
$$;

create function @engine@._load_nodes_v1(p_instance varchar)
returns table (id varchar, node_type text, query text, result_name text, left_node varchar,
               right_node varchar, status text, result jsonb, status_details jsonb)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           n.result, n.status_details
    from df.nodes n where n.instance_id operator(pg_catalog.=) p_instance
$$;

create function @engine@._load_results_v1(p_instance varchar)
returns table (name text, value jsonb)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select r.name, r.value from @engine@.results r
    where r.instance_id operator(pg_catalog.=) p_instance
    order by r.seq
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
    delete from @engine@.tasks t where t.instance_id operator(pg_catalog.=) p_instance;
    delete from @engine@.signals s where s.instance_id operator(pg_catalog.=) p_instance;
    delete from @engine@.results r where r.instance_id operator(pg_catalog.=) p_instance;
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
-- pgdurable schema, part 60: recurring jobs (df.schedule and friends; not in pg_durable).
--
-- A job is a role's named graph with a cron expression. Each firing starts a new instance,
-- labelled with the job's name, as that role (the steps run as it, as for its own df.start);
-- a failed run does not stop the job. The engine's workers fire the jobs (pgdurable/worker/
-- schedules.py): cron ticks are computed in Python (pgdurable/cron.py, UTC), so the worker
-- writes next_run_at and this file only ever reads it or clears it (NULL: "the next worker
-- computes it").
--
--   df.schedule(name, cron, graph, overlap)   create or replace the caller's job
--   df.unschedule(name)                        delete it
--   df.pause_schedule(name) / df.resume_schedule(name)
--   df.list_schedules()                        the caller's jobs (a superuser's: everyone's)
--   @engine@._schedule_fire_v1(role, name, next)   the worker's firing of one due job
--
-- Exactly once per slot: a firing locks the job's row (SKIP LOCKED: two serves never wait on
-- each other), checks it is still due, starts the instance and moves next_run_at past now in
-- the same transaction. After downtime a job whose slot passed fires once, then moves to the
-- first slot after now (missed slots are not replayed one by one, as pg_cron does).
--
-- overlap: 'skip' (default) does not start while the job's previous run is still pending or
-- running, and waits for the next slot; 'queue' keeps the slot due and starts as soon as the
-- previous run ends (once, whatever number of slots passed meanwhile); 'allow' always starts.
--
-- The table is the engine's (no tenant privilege on it); the df functions are SECURITY
-- DEFINER and act only on the calling role's jobs (@engine@._invoker(), as df.cancel does).

create table @engine@.schedules (
    role                oid         not null,
    name                text        not null,
    cron                text        not null,
    graph               text        not null,
    overlap             text        not null default 'skip',
    enabled             boolean     not null default true,
    created_at          timestamptz not null default now(),
    next_run_at         timestamptz,
    last_run_at         timestamptz,
    last_instance_id    text,
    last_error          text,
    runs                bigint      not null default 0,
    failures            bigint      not null default 0,
    -- the last run whose outcome is counted in failures (counted at the next firing)
    counted_instance_id text,
    primary key (role, name),
    constraint schedules_overlap_check check (overlap in ('skip', 'queue', 'allow')),
    constraint schedules_name_check check (name <> '' and octet_length(name) <= 200)
);
create index schedules_due_idx on @engine@.schedules (next_run_at) where enabled;

-- The role calling a df schedule function, as a regrole (NULL if it is no role).
create function @engine@._schedule_role_v1() returns regrole
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select r.oid::pg_catalog.regrole from pg_catalog.pg_roles r
    where r.rolname operator(pg_catalog.=) @engine@._invoker()
$$;

create function @engine@._schedule_name_v1(p_name text) returns text
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_name is null or pg_catalog.btrim(p_name) operator(pg_catalog.=) '' then
        raise exception 'a schedule needs a name (got %)', pg_catalog.quote_nullable(p_name)
            using errcode = '22023';
    end if;
    if pg_catalog.octet_length(p_name) operator(pg_catalog.>) 200 then
        raise exception 'schedule name is too long (% bytes; at most 200): %…',
            pg_catalog.octet_length(p_name), pg_catalog.left(p_name, 40) using errcode = '22023';
    end if;
    return p_name;
end;
$$;

create function df.schedule(name text, cron text, graph text, overlap text default 'skip')
returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    v_me      pg_catalog.regrole := @engine@._schedule_role_v1();
    v_name    pg_catalog.text := @engine@._schedule_name_v1(name);
    v_overlap pg_catalog.text := pg_catalog.lower(pg_catalog.btrim(overlap));
begin
    if v_overlap is null or v_overlap not in ('skip', 'queue', 'allow') then
        raise exception 'invalid overlap %: expected ''skip'', ''queue'' or ''allow''',
            pg_catalog.quote_nullable(overlap) using errcode = '22023';
    end if;
    if cron is null then
        raise exception 'df.schedule: cron must not be NULL' using errcode = '22023';
    end if;
    perform df._check_cron(cron);
    if graph is null then
        raise exception 'df.schedule: graph must not be NULL' using errcode = '22023';
    end if;
    -- everything df.start checks (the graph, LOGIN, the superuser gate), without starting
    perform @engine@._start_v1(v_me, graph, v_name, null, true);
    insert into @engine@.schedules as s (role, name, cron, graph, overlap)
    values (v_me::pg_catalog.oid, v_name, cron, graph, v_overlap)
    on conflict on constraint schedules_pkey do update
        set cron = excluded.cron, graph = excluded.graph, overlap = excluded.overlap,
            enabled = true, next_run_at = null, last_error = null;
    perform pg_catalog.pg_notify('pgdurable_work', '');
    return v_name;
end;
$$;

create function df.unschedule(name text) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
begin
    delete from @engine@.schedules s
    where s.role operator(pg_catalog.=) @engine@._schedule_role_v1()::pg_catalog.oid
      and s.name operator(pg_catalog.=) name;
    return found;
end;
$$;

create function df.pause_schedule(name text) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
begin
    update @engine@.schedules s set enabled = false, next_run_at = null
    where s.role operator(pg_catalog.=) @engine@._schedule_role_v1()::pg_catalog.oid
      and s.name operator(pg_catalog.=) name;
    return found;
end;
$$;

-- Resuming computes the next slot from now: the slots of the pause are not caught up.
create function df.resume_schedule(name text) returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
begin
    update @engine@.schedules s set enabled = true, next_run_at = null
    where s.role operator(pg_catalog.=) @engine@._schedule_role_v1()::pg_catalog.oid
      and s.name operator(pg_catalog.=) name;
    if found then
        perform pg_catalog.pg_notify('pgdurable_work', '');
    end if;
    return found;
end;
$$;

-- The caller's jobs; superusers and BYPASSRLS roles see every role's (as df.instances shows
-- them every instance). last_status is the last run's instance status, read now (NULL once
-- retention pruned it); failures counts failed starts and failed runs, the last one included.
create function df.list_schedules()
returns table (name text, cron text, enabled boolean, next_run_at timestamptz,
               last_run_at timestamptz, last_instance_id text, last_status text, runs bigint,
               failures bigint, overlap text, last_error text, owner text)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select s.name, s.cron, s.enabled, s.next_run_at, s.last_run_at, s.last_instance_id,
           i.status, s.runs,
           s.failures operator(pg_catalog.+)
               case when i.status operator(pg_catalog.=) 'failed'
                         and s.counted_instance_id is distinct from s.last_instance_id
                    then 1 else 0 end,
           s.overlap, s.last_error, s.role::pg_catalog.regrole::pg_catalog.text
    from @engine@.schedules s
    left join df.instances i on i.id operator(pg_catalog.=) s.last_instance_id
    where @engine@._may_act(s.role::pg_catalog.regrole)
    order by s.role::pg_catalog.regrole::pg_catalog.text, s.name
$$;

-- Fire one job if it is still due: called by the worker with the job's next slot after now
-- (computed in Python). Returns the instance id started, or NULL (not due any more, taken by
-- another worker, skipped for overlap, or its start failed: last_error says why). SECURITY
-- DEFINER so that it reads and writes df.instances as their owner (past RLS), for the job's
-- role; not callable by tenants (engine schema, no grant).
create function @engine@._schedule_fire_v1(p_role oid, p_name text, p_next timestamptz)
returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s       record;
    v_prev  pg_catalog.text;
    v_id    pg_catalog.text;
    v_fail  pg_catalog.int8 := 0;
    v_err   pg_catalog.text;
begin
    select * into s from @engine@.schedules j
    where j.role operator(pg_catalog.=) p_role and j.name operator(pg_catalog.=) p_name
      and j.enabled and j.next_run_at operator(pg_catalog.<=) pg_catalog.now()
    for update skip locked;
    if not found then
        return null;
    end if;
    -- the role is gone, or no longer given df.grant_usage: the job cannot run any more
    if not exists (select 1 from pg_catalog.pg_roles r where r.oid operator(pg_catalog.=) p_role) then
        delete from @engine@.schedules j
        where j.role operator(pg_catalog.=) p_role and j.name operator(pg_catalog.=) p_name;
        return null;
    end if;
    if not pg_catalog.has_schema_privilege(p_role, 'df', 'USAGE') then
        update @engine@.schedules j
        set enabled = false, next_run_at = null,
            last_error = pg_catalog.format('paused: role %s no longer has usage on df (df.grant_usage)',
                                           p_role::pg_catalog.regrole)
        where j.role operator(pg_catalog.=) p_role and j.name operator(pg_catalog.=) p_name;
        return null;
    end if;
    select i.status into v_prev from df.instances i
    where i.id operator(pg_catalog.=) s.last_instance_id;
    if v_prev in ('pending', 'running') then
        if s.overlap operator(pg_catalog.=) 'queue' then
            return null;  -- stays due: fires when the previous run has ended
        elsif s.overlap operator(pg_catalog.=) 'skip' then
            update @engine@.schedules j set next_run_at = p_next
            where j.role operator(pg_catalog.=) p_role and j.name operator(pg_catalog.=) p_name;
            return null;
        end if;
    end if;
    if v_prev operator(pg_catalog.=) 'failed'
       and s.counted_instance_id is distinct from s.last_instance_id then
        v_fail := 1;
    end if;
    -- this transaction acts for the job's role (@engine@._invoker(), as a launch does)
    insert into @engine@.step_sessions as t (pid, xid, role)
    values (pg_catalog.pg_backend_pid(), pg_catalog.txid_current(), p_role)
    on conflict (pid) do update set xid = excluded.xid, role = excluded.role;
    begin
        v_id := @engine@._start_v1(p_role::pg_catalog.regrole, s.graph, s.name, null);
    exception when others then
        v_err := sqlerrm;
    end;
    update @engine@.schedules j
    set next_run_at = p_next,
        last_run_at = pg_catalog.now(),
        last_instance_id = coalesce(v_id, j.last_instance_id),
        counted_instance_id = case when v_fail operator(pg_catalog.=) 1 then j.last_instance_id
                                   else j.counted_instance_id end,
        last_error = case when v_err is null then null
                          else pg_catalog.left('could not start: ' || v_err, 2000) end,
        runs = j.runs operator(pg_catalog.+) case when v_id is null then 0 else 1 end,
        failures = j.failures operator(pg_catalog.+) v_fail
                   operator(pg_catalog.+) case when v_err is null then 0 else 1 end
    where j.role operator(pg_catalog.=) p_role and j.name operator(pg_catalog.=) p_name;
    return v_id;
end;
$$;
-- pgdurable schema, part 90: privileges (SPEC §4 "Grants"), applied after every other part.
--
-- Roles (created by pgdurable install, docs/security.md): pgdurable_owner (NOLOGIN) owns every
-- object here; pgdurable_service (LOGIN) is a member of it and runs the engine, never a
-- tenant's statement; pgdurable_step (LOGIN, member of nothing, owns nothing) is the session
-- a tenant's statement runs in: it may call only the runners, the token-gated _step_*
-- functions below and the settings helpers its step queries use (catalog reads), so code a
-- tenant leaves behind in that session can do nothing with it.
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
-- (the runners in @engine@_exec belong to their tenants: df.grant_usage revokes PUBLIC's
-- EXECUTE on each one it makes. A blanket REVOKE here would fail in an upgrade, which runs as
-- pgdurable_owner, once tenants' runners exist.)

-- the step role: the runners' schema (EXECUTE on each runner is granted when it is made) and
-- the token-gated functions of a step transaction; the settings helper its settings query uses
grant usage on schema @engine@ to pgdurable_step;
grant usage on schema @engine@_exec to pgdurable_step;
grant execute on function
    @engine@.setting(text, text),
    -- a step's own settings (00_tables.sql), applied by the step queries: catalog reads and
    -- set_config as the step role, nothing it could not do itself
    @engine@._role_settings_v1(oid, text),
    @engine@.setting_db(text, text),
    @engine@._role_setting_v1(oid, text),
    @engine@._setting_pinned_v1(text),
    @engine@._timeout_ms_v1(text, text),
    @engine@._step_begin_v1(text, oid),
    @engine@._step_apply_v1(text, text, varchar, varchar, integer, bigint, bytea, text, jsonb,
                            jsonb, text[], jsonb, integer),
    @engine@._step_load_instance_v1(text, varchar),
    @engine@._step_load_nodes_v1(text, varchar),
    @engine@._step_load_results_v1(text, varchar),
    @engine@._step_lock_run_v1(text, varchar)
    to pgdurable_step;
-- a runner checks its caller's capability as its owning tenant: anyone may ask (USAGE on the
-- engine schema is still needed, which df.grant_usage gives)
grant execute on function @engine@._cap_check_v1(text) to public;
-- df.grant_usage (SECURITY INVOKER) asks whether a role's runner is in place; a catalog read
grant execute on function @engine@._runner_ok_v1(oid), @engine@._runner_body_v1(),
    @engine@._runner_body_schema3_v1(), @engine@._runner_ddl_v1(regrole, text) to public;
