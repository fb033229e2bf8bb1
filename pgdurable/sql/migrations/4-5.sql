-- Schema version 4 -> 5: df.restart (restart a failed or cancelled instance from where it
-- stopped) and df.instance_runs (the run history it keeps); df.retry and its node type RETRY
-- (run a step again when it fails, with backoff).
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

-- == df.retry: the RETRY node type (00_tables.sql's checks, valid as a fresh install's:
--    existing rows pass, the checks only accept more), the DSL (10_dsl.sql: df.retry, df._retry_config,
--    df._node_types) and df.start's validation of it (30_control.sql: df._retry_problem,
--    df._graph_flatten, @engine@._enqueue_v1) ==
alter table df.nodes
    drop constraint nodes_type_check,
    add constraint nodes_type_check check (node_type in ('SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE',
        'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'RETRY')),
    drop constraint nodes_structure_check,
    add constraint nodes_structure_check check (
        case
            when node_type in ('SQL', 'SLEEP', 'WAIT_SCHEDULE', 'BREAK', 'HTTP', 'HTTP_MULTIPART',
                               'SIGNAL')
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
        end);
-- @definitions-of 10_dsl.sql
-- @definitions-of 30_control.sql

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
