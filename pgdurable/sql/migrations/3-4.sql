-- Schema version 3 -> 4 (pgdurable 0.4): correctness and pg_durable compatibility.
--
-- Runs as pgdurable_owner (the owner of every object since version 3). Functions are re-made
-- from the current schema files (-- @definitions-of lines, expanded by schema.py); a function
-- whose argument list or result type changed is dropped first (CREATE OR REPLACE cannot
-- change either).

-- == functions whose signature or result type changed (dropped, re-made below) ==

-- Result types, argument names and return types as pg_durable 0.2.6 has them (docs/api.md).
-- A role given EXECUTE on one of these explicitly (df.grant_usage(..., with_grant => true)
-- hands out grant_usage/revoke_usage) keeps it: the grants are noted here, in a setting local
-- to this transaction, and given again (by the owner) after the functions are re-made.
select pg_catalog.set_config('pgdurable.migrate_acl', coalesce((
    select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
               'fn', p.oid::pg_catalog.regprocedure::pg_catalog.text,
               'role', a.grantee::pg_catalog.regrole::pg_catalog.text,
               'grantable', a.is_grantable))
    from pg_catalog.pg_proc p
    cross join lateral pg_catalog.aclexplode(p.proacl) a
    -- (to_regprocedure: a database that came from version 2 through 2-3.sql, which makes the
    -- current definitions, may already have some of them in their new form)
    where p.oid operator(pg_catalog.=) any (select pg_catalog.to_regprocedure(f)::pg_catalog.oid
                                            from pg_catalog.unnest(array[
              'df.start(text,text,text,text)', 'df.signal(text,text,text)', 'df.run(text)',
              'df.list_instances(text,integer,text,text)', 'df.list_instances(text,integer)',
              'df.instance_info(text)', 'df.instance_executions(text,integer)',
              'df.instance_nodes(text)', 'df.instance_nodes(text,integer)',
              'df.grant_usage(text,boolean,boolean)', 'df.revoke_usage(text)'
          ]) f)
      and a.privilege_type operator(pg_catalog.=) 'EXECUTE'
      and a.grantee operator(pg_catalog.<>) 0
      and a.grantee operator(pg_catalog.<>) p.proowner)::pg_catalog.text, '[]'), true);

drop function if exists df.start(text, text, text, text);    -- returns text (was varchar); + idempotency_key
drop function if exists df.signal(text, text, text);                   -- data -> signal_data
drop function if exists df.run(text);                                  -- returns text (was void)
drop function if exists df.list_instances(text, integer, text, text);  -- instance_id text, execution_count bigint
drop function if exists df.list_instances(text, integer);              -- the same
drop function if exists df.instance_info(text);                        -- instance_id text, current_execution_id bigint
drop function if exists df.instance_executions(text, integer);         -- execution_id bigint
drop function if exists df.instance_nodes(text);                       -- instance_id_param; id columns text
drop function if exists df.instance_nodes(text, integer);              -- + execution_id; _last_n_executions
drop function if exists df.grant_usage(text, boolean, boolean);        -- returns void (was text)
drop function if exists df.revoke_usage(text);                         -- returns void (was text)
drop function @engine@._load_instance_v1(varchar);           -- + the role's loop settings
drop function @engine@._step_load_instance_v1(text, varchar);  -- the same

-- == tables ==

-- idempotent starts: the key, one instance per role and key; every role that may insert
-- instances may give one (df.grant_usage grants it from now on)
alter table df.instances add column idempotency_key text;
create unique index instances_idempotency_idx on df.instances (submitted_by, idempotency_key)
    where idempotency_key is not null;
do $$
declare
    r record;
begin
    for r in select a.rolname,
                    pg_catalog.has_column_privilege(a.oid, 'df.instances', 'label',
                                                    'insert with grant option') as opt
             from pg_catalog.pg_roles a
             where pg_catalog.has_column_privilege(a.oid, 'df.instances', 'label', 'insert')
               and not a.rolsuper
               and not pg_catalog.pg_has_role(a.oid, 'pgdurable_owner', 'usage') loop
        execute format('grant insert (idempotency_key) on df.instances to %I%s', r.rolname,
                       case when r.opt then ' with grant option' else '' end);
    end loop;
end;
$$;

-- df.vars.owner defaults to the caller as pg_durable has it (a role name that needs quoting
-- resolves too)
alter table df.vars alter column owner set default quote_ident(current_user)::regrole;

-- @definitions-of 00_tables.sql
-- @definitions-of 10_dsl.sql
-- @include 35_references.sql
-- @definitions-of 30_control.sql
-- @definitions-of 40_inspect.sql
-- @definitions-of 50_engine.sql
-- @include 60_schedules.sql
-- @include 90_grants.sql

-- the explicit grants on the functions dropped in the first section, given again
do $$
declare
    r record;
begin
    for r in select x.fn, x.role, x.grantable
             from pg_catalog.jsonb_to_recordset(
                      pg_catalog.current_setting('pgdurable.migrate_acl')::pg_catalog.jsonb)
                  as x(fn pg_catalog.text, role pg_catalog.text, grantable boolean) loop
        -- df.start gained an argument (idempotency_key): its grant goes to the new form
        if r.fn operator(pg_catalog.=) 'df.start(text,text,text,text)' then
            r.fn := 'df.start(text,text,text,text,text)';
        end if;
        continue when pg_catalog.to_regprocedure(r.fn) is null;
        execute pg_catalog.format('grant execute on function %s to %s%s',
                                  pg_catalog.to_regprocedure(r.fn), r.role,
                                  case when r.grantable then ' with grant option' else '' end);
    end loop;
end;
$$;
