-- Schema version 4 -> 5: df.restart (restart a failed or cancelled instance from where it
-- stopped) and df.instance_runs (the run history it keeps).
--
-- Runs as pgdurable_owner (the owner of every object since version 3). Functions are re-made
-- from the current schema files (-- @definitions-of lines, expanded by schema.py). No existing
-- signature changes: every df function keeps its pg_durable 0.2.6 form.
--
-- Changed behaviour of existing functions (50_engine.sql): a failed or cancelled instance
-- keeps its named results and unconsumed signals (df.restart goes on with them) until it is
-- pruned, and pruning removes them with the run history.

-- == a repair: 3-4.sql granted INSERT (idempotency_key) on df.instances to every role that
--    may insert its other columns, and has_column_privilege says yes for the predefined
--    pg_write_all_data (PostgreSQL 14+), which may write every table anyway: an install makes
--    no such grant ==
do $$
begin
    if pg_catalog.to_regrole('pg_write_all_data') is not null then
        revoke insert (idempotency_key) on df.instances from pg_write_all_data;
    end if;
end;
$$;

-- == the new table and functions (a new file: applied whole) ==
-- @include 70_restart.sql

-- == re-made: df._usage_helpers names the new engine helpers; _apply_v1, _fail_instance_v1
--    and _prune_v1 as above; the settings helpers and clock() in plpgsql (00_tables.sql:
--    plans kept per session), _claim_v1 and the loads too (50_engine.sql) ==
-- @definitions-of 00_tables.sql
-- @definitions-of 40_inspect.sql
-- @definitions-of 50_engine.sql
-- @include 90_grants.sql

-- == tenants already granted get what df.grant_usage now gives: EXECUTE on the new helpers
--    (df.restart and df.instance_runs call them), with the grant option where they hold
--    the existing helpers with it (a delegated admin passes them on) ==
do $$
declare
    r record;
begin
    for r in select a.grantee::pg_catalog.regrole::pg_catalog.text as role, a.is_grantable
             from pg_catalog.pg_proc p
             cross join lateral pg_catalog.aclexplode(p.proacl) a
             where p.oid operator(pg_catalog.=)
                       pg_catalog.to_regprocedure('@engine@._cancel_v1(varchar,text)')::pg_catalog.oid
               and a.privilege_type operator(pg_catalog.=) 'EXECUTE'
               and a.grantee operator(pg_catalog.<>) 0
               and a.grantee operator(pg_catalog.<>) p.proowner loop
        execute pg_catalog.format(
            'grant execute on function @engine@._restart_v1(pg_catalog.varchar), '
            '@engine@._run_history_v1(pg_catalog.varchar) to %s%s',
            r.role, case when r.is_grantable then ' with grant option' else '' end);
    end loop;
end;
$$;
