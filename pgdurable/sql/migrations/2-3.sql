-- run-as: installer
-- Schema version 2 -> 3 (pgdurable 0.3): least privilege (docs/security.md).
--
-- Run by the administrator that installs (install.py made the roles first). Every object of
-- df, @engine@ and @engine@_exec is handed to pgdurable_owner; the new tables (step
-- capabilities, step slots, engine locks) appear; the functions are re-made from the current
-- schema files (-- @definitions-of lines, expanded by schema.py); tenants lose table-level
-- DML on df.vars; every tenant's runner is re-made in its new form by df.grant_usage.
-- Workers of version 2 cannot run beside version 3: stop them before upgrading.

do $$
declare
    r record;
begin
    for r in select n.nspname from pg_catalog.pg_namespace n
             where n.nspname in ('df', '@engine@', '@engine@_exec') loop
        execute format('alter schema %I owner to pgdurable_owner', r.nspname);
    end loop;
    for r in select c.oid::regclass::text as name, c.relkind
             from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
             where n.nspname in ('df', '@engine@') and c.relkind in ('r', 'v', 'p') loop
        execute format('alter %s %s owner to pgdurable_owner',
                       case r.relkind when 'v' then 'view' when 'S' then 'sequence' else 'table' end,
                       r.name);
    end loop;
    for r in select p.oid::regprocedure::text as name
             from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
             where n.nspname in ('df', '@engine@') loop
        execute format('alter function %s owner to pgdurable_owner', r.name);
    end loop;
end;
$$;

create table @engine@.step_caps (
    pid        integer     not null primary key,
    token_hash bytea       not null,
    worker_id  text        not null,
    created_at timestamptz not null default now()
);
create table @engine@.step_slots (
    slot integer not null primary key
);
create table @engine@.role_slots (
    role oid     not null,
    slot integer not null,
    primary key (role, slot)
);
create table @engine@.locks (
    name text not null primary key
);
insert into @engine@.locks (name) values ('prune');
insert into @engine@.locks (name) select 'launch:' || g from generate_series(0, 15) g;
create table @engine@.launcher (
    sentinel boolean not null primary key default true check (sentinel),
    rolname  name    not null,
    password text    not null
);
alter table @engine@.launcher owner to pgdurable_owner;
alter table @engine@.step_caps owner to pgdurable_owner;
alter table @engine@.step_slots owner to pgdurable_owner;
alter table @engine@.role_slots owner to pgdurable_owner;
alter table @engine@.locks owner to pgdurable_owner;

-- functions gone or with a new signature
drop function @engine@._runner_v1(regrole);
drop function @engine@._step_begin_v1(oid);
-- ... and those whose result type or argument names changed in a later version (the
-- definitions below are the current ones; 3-4.sql says what changed)
drop function if exists df.start(text, text, text, text);
drop function if exists df.signal(text, text, text);
drop function if exists df.run(text);
drop function if exists df.list_instances(text, integer, text, text);
drop function if exists df.list_instances(text, integer);
drop function if exists df.instance_info(text);
drop function if exists df.instance_executions(text, integer);
drop function if exists df.instance_nodes(text);
drop function if exists df.instance_nodes(text, integer);
drop function if exists df.grant_usage(text, boolean, boolean);
drop function if exists df.revoke_usage(text);

set local role pgdurable_owner;
-- the definitions below are the CURRENT ones (they may name columns a later migration adds):
-- created without checking their bodies, and re-made by each later migration in turn
set local check_function_bodies = off;
-- @definitions-of 00_tables.sql
-- @definitions-of 10_dsl.sql
-- @definitions-of 30_control.sql
-- @definitions-of 40_inspect.sql
-- @definitions-of 50_engine.sql
reset role;

-- old runners (step_<oid>(text)) go; df.grant_usage below makes each role's new one
do $$
declare
    r record;
begin
    for r in select p.oid::regprocedure::text as name
             from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
             where n.nspname = '@engine@_exec' loop
        execute format('drop function %s', r.name);
    end loop;
end;
$$;

set local role pgdurable_owner;
-- @include 90_grants.sql
reset role;

-- every role granted before: DML on df.vars goes, the runner is re-made (as the
-- administrator, which must be able to act as each role; df.grant_usage warns where not)
do $$
declare
    r record;
begin
    for r in select a.rolname,
                    pg_catalog.has_function_privilege(a.oid, 'df.http(text,text,text,jsonb,integer)',
                                                      'execute') as http
             from pg_catalog.pg_roles a
             where pg_catalog.has_schema_privilege(a.oid, 'df', 'usage')
               and not a.rolsuper and a.rolname !~ '^pg_'
               and a.rolname not in ('pgdurable_owner', 'pgdurable_service', 'pgdurable_step')
               and not pg_catalog.pg_has_role(a.oid, 'pgdurable_owner', 'usage') loop
        execute format('revoke insert, update, delete, truncate on df.vars from %I cascade', r.rolname);
        perform df.grant_usage(r.rolname, r.http);
    end loop;
end;
$$;
