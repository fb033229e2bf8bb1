-- pgdurable schema, part 00: tables, indexes, RLS and small shared helpers.
--
-- Map of the whole schema (files in pgdurable/sql/schema/ are applied in name order):
--   00_tables.sql   df.instances, df.nodes, df.vars, df._worker_epoch (the pg_durable contract,
--                   docs/api.md "Tables and views") and the engine schema @engine@ (runnable work + leases, scheduler
--                   state, signal inbox, workers, readiness, migrations); RLS; settings/clock helpers
--   10_dsl.sql      the DSL: df.sql/seq/as/join/join3/race/if/if_rows/loop/break/sleep/
--                   wait_for_schedule/wait_for_signal/http/http_multipart + auto-wrap + validation
--   20_operators.sql the seven operators ~> |=> & | ?> !> @> (schema chosen at install)
--   30_control.sql  df.start/signal/cancel/status/result/error/await_instance and the engine
--                   helpers they call (SECURITY DEFINER, fixed search_path)
--   38_foreach.sql  df.foreach (docs/foreach.md): the DSL, the engine's ticks, the triggers that
--                   wake a FOREACH when a body ends and cancel its bodies when it stops
--   40_inspect.sql  df.list_instances/instance_nodes/instance_info/instance_executions/explain/
--                   metrics, vars functions, grant_usage/revoke_usage, misc (version, run, ...)
--   70_restart.sql  df.restart / df.instance_runs: restart a failed or cancelled instance from
--                   where it stopped (docs/restart.md), and the run history it keeps
--   90_grants.sql   privileges: no PUBLIC access except EXECUTE on ordinary df functions
--
-- Placeholders substituted by pgdurable/schema.py at install time:
--   @engine@   the engine schema (default pgdurable)        @version@ the package version
--   @opschema@ the schema that receives the operators (pg_catalog when superuser, else public)
--
-- Conventions: lower-case keywords; p_ parameters, v_ locals; identifiers composed only with
-- format('%I'); every engine function a worker calls carries a _v1 suffix.

-- The schemas df, @engine@ and @engine@_exec are created by pgdurable install (schema.py),
-- owned by pgdurable_owner, before this file runs as that role. @engine@_exec holds the
-- per-role step runners (docs/security.md): nobody but the engine can even name it, so a
-- tenant owns its runner but cannot ALTER it.

------------------------------------------------------------------------------------------
-- df: the user-facing contract tables (docs/api.md "Tables and views")
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
        'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'RETRY',
        'FOREACH')) not valid,
    constraint nodes_result_name_check
        check (result_name is null or result_name ~ '^[A-Za-z_][A-Za-z0-9_]*$') not valid,
    -- structure per node type (docs/api.md "Tables and views")
    constraint nodes_structure_check check (
        case
            when node_type in ('SQL', 'SLEEP', 'WAIT_SCHEDULE', 'BREAK', 'HTTP', 'HTTP_MULTIPART',
                               'SIGNAL', 'FOREACH')
                then query is not null and left_node is null and right_node is null
            when node_type in ('THEN', 'RACE')
                then query is null and left_node is not null and right_node is not null
            when node_type = 'IF'
                then query is not null and left_node is not null and right_node is not null
            when node_type = 'LOOP' then left_node is not null and right_node is null
            when node_type = 'RETRY'
                then query is not null and left_node is not null and right_node is null
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
-- the instances an older package's worker must leave alone during a rolling upgrade (node
-- types newer than it: _claim_v1 in 50_engine.sql); small, one probe per claimed task
create index nodes_newer_types_idx on df.nodes (instance_id) where node_type in ('RETRY', 'FOREACH');

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
-- engine schema: private to the service (layout may change through migrations)
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

-- Per-instance engine data: the frozen vars snapshot (docs/api.md "Substitution"), the scheduler state blob
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

-- Named results as the instance's steps see them (docs/api.md "Substitution", D9): the latest value of each
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
-- the claim's instance affinity (is a task of this instance leased by another worker?): one
-- index probe each side of the claiming worker's name, not a walk of every task of the
-- instance (a fan-out of 100 held 100 tasks, walked for every candidate row of a claim)
create index tasks_owner_idx on @engine@.tasks (instance_id, lease_owner) where lease_owner is not null;

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

-- df.foreach (docs/foreach.md): a FOREACH activation whose rows query ran (its gen: a loop's
-- next iteration is a new activation and runs the query again; df.restart moves the rows to
-- the node's new activation, 38_foreach.sql), and one row per row of the query, numbered 1..n
-- in the order the query returned them: the child instance that runs the body for it, its
-- status ('pending' not started, 'running', 'completed', 'failed', 'cancelled'; 'restart':
-- df.restart of the parent restarts this child) and, once it ended, its result or error
-- (copied when the child ends: pruning a child loses nothing its parent needs). Gone with the
-- parent's runs row (pruned). Tenants hold no privilege on them (like every engine table);
-- RLS keeps each row to its owner besides.
create table @engine@.foreach_runs (
    instance_id  varchar(8)  not null
        references @engine@.runs (instance_id) on delete cascade,
    node_id      varchar(8)  not null,
    gen          integer     not null,
    row_count    integer     not null,
    max_parallel integer     not null,
    body         jsonb       not null,  -- the body flattened as df.start stores a graph
    names        text[]      not null,  -- the parent's named results the body refers to
    label        text        not null,  -- children are labelled '<label> row <n>'
    submitted_by regrole     not null,
    created_at   timestamptz not null default now(),
    primary key (instance_id, node_id)
);
create table @engine@.foreach_items (
    instance_id  varchar(8)  not null,
    node_id      varchar(8)  not null,
    ord          integer     not null,
    item         jsonb       not null,
    child_id     varchar(8),
    status       text        not null default 'pending'
        check (status in ('pending', 'running', 'completed', 'failed', 'cancelled', 'restart')),
    result       jsonb,
    error        text,
    submitted_by regrole     not null,
    primary key (instance_id, node_id, ord),
    foreign key (instance_id, node_id)
        references @engine@.foreach_runs (instance_id, node_id) on delete cascade
);
create unique index foreach_items_child_idx on @engine@.foreach_items (child_id)
    where child_id is not null;
-- what a tick looks for: the rows not completed yet (the ones in progress, the next to start)
create index foreach_items_open_idx on @engine@.foreach_items (instance_id, node_id, status, ord)
    where status <> 'completed';
alter table @engine@.foreach_runs enable row level security;
alter table @engine@.foreach_items enable row level security;
create policy foreach_runs_owner on @engine@.foreach_runs for all
    using (submitted_by = quote_ident(current_user)::regrole)
    with check (submitted_by = quote_ident(current_user)::regrole);
create policy foreach_items_owner on @engine@.foreach_items for all
    using (submitted_by = quote_ident(current_user)::regrole)
    with check (submitted_by = quote_ident(current_user)::regrole);

------------------------------------------------------------------------------------------
-- shared helpers
------------------------------------------------------------------------------------------

-- pg_durable.* settings are plain custom GUCs read at call time with a default, so
-- ALTER DATABASE/ALTER SYSTEM/SET work without an extension (README.md). Where each one is read
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
language plpgsql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$ begin return coalesce(nullif(pg_catalog.current_setting('pg_durable.' || p_name, true), ''), p_default); end $$;

-- These helpers are plpgsql, not sql: the SET clause keeps a SQL function from being inlined,
-- and PostgreSQL before 18 plans a non-inlined SQL function on every call (setting_db cost
-- 0.09 ms a call that way, 0.005 ms as plpgsql, which keeps its plans for the session).
--
-- A deployment-wide setting: the database's own default (ALTER DATABASE … SET), read from the
-- catalog on every call so a change applies within seconds, without anyone reconnecting;
-- else the server's value (postgresql.conf / ALTER SYSTEM, reloaded by PostgreSQL); else
-- p_default. The engine calls it only in its own sessions, where nothing SETs pg_durable.*
-- (a step session is RESET before each step, and reads it before the step's statement), so
-- no tenant's SET or ALTER ROLE … SET reaches it. A session keeps a database default it
-- connected with after ALTER DATABASE … RESET: the worker recycles its sessions when it sees
-- one go (pgdurable/worker/settings.py, Settings.load).
create function @engine@.setting_db(p_name text, p_default text) returns text
language plpgsql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    return (
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
            p_default));
end
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
language plpgsql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    return (
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
        limit 1);
end
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
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    return pg_catalog.lower(p_name) operator(pg_catalog.=) any (array[
               'role', 'session_authorization', 'client_encoding', 'application_name',
               'idle_in_transaction_session_timeout', 'statement_timeout'])
        or pg_catalog.lower(p_name) operator(pg_catalog.~)
               '^(transaction_|default_transaction_|df\.|pgdurable\.|pg_durable\.)';
end
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
-- _role_settings_v2 also returns the names and values of the other settings it applied, so
-- that the next steps of a batch (one role, a few milliseconds) apply the same again without
-- reading the catalog (step_next: a batch's steps see a settings change at its next batch).
-- _role_settings_v1 (older workers' queries): the same, without them.
create function @engine@._role_settings_v2(p_role oid, p_step_timeout text)
returns table (search_path text, statement_timeout text, names text[], vals text[])
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
    v_names    pg_catalog.text[] := '{}';
    v_vals     pg_catalog.text[] := '{}';
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
                v_names := v_names operator(pg_catalog.||) r.name;
                v_vals := v_vals operator(pg_catalog.||) r.value;
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
    return query select v_path, least(v_best, 2147483647)::pg_catalog.text, v_names, v_vals;
end
$$;


create function @engine@._role_settings_v1(p_role oid, p_step_timeout text)
returns table (search_path text, statement_timeout text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    return query select r.search_path, r.statement_timeout
                 from @engine@._role_settings_v2(p_role, p_step_timeout) r;
end
$$;

-- The clock every df function and engine query uses for due times. Tests control it
--: pg_durable.fake_now pins it (SQL tests), pg_durable.clock_offset shifts a
-- running clock (acceptance tests of cron schedules: ALTER DATABASE … SET before serve
-- starts). Production sets neither.
create function @engine@.clock() returns timestamptz
language plpgsql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
    return coalesce(nullif(pg_catalog.current_setting('pg_durable.fake_now', true), '')::pg_catalog.timestamptz,
                    pg_catalog.now())
           + coalesce(nullif(pg_catalog.current_setting('pg_durable.clock_offset', true), '')::pg_catalog.interval,
                      '0'::pg_catalog.interval);
end
$$;

-- True inside a workflow step session (the worker sets df.in_workflow = 'true').
create function @engine@.in_workflow() returns boolean
language plpgsql stable parallel safe
set search_path = pg_catalog, pg_temp
as $$ begin return coalesce(pg_catalog.current_setting('df.in_workflow', true), '') = 'true'; end $$;
