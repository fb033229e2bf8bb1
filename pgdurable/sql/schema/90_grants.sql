-- pgdurable schema, part 90: privileges (docs/api.md "Grants"), applied after every other part.
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
    @engine@._role_settings_v2(oid, text),
    @engine@.setting_db(text, text),
    @engine@._role_setting_v1(oid, text),
    @engine@._setting_pinned_v1(text),
    @engine@._timeout_ms_v1(text, text),
    @engine@._step_begin_v1(text, oid),
    @engine@._step_reset_v1(),
    @engine@._step_next_v1(text[], text[], text, text, text, oid, text, text, bigint, text[]),
    @engine@._step_apply_v1(text, text, varchar, varchar, integer, bigint, bytea, text, jsonb,
                            jsonb, text[], jsonb, integer),
    @engine@._step_apply_v2(text, text, integer, varchar[], bigint[], integer[], text[],
                            bytea[], varchar[], varchar[], integer[], varchar[], varchar[],
                            jsonb, jsonb, jsonb),
    @engine@._all_written_v1(bigint[]),
    @engine@._step_load_instance_v1(text, varchar),
    @engine@._step_load_nodes_v1(text, varchar),
    @engine@._step_load_results_v1(text, varchar),
    @engine@._step_load_v2(text, varchar),
    @engine@._step_lock_run_v1(text, varchar)
    to pgdurable_step;
-- (and @engine@._step_foreach_rows_v1, granted where 38_foreach.sql makes it)
-- a runner checks its caller's capability as its owning tenant: anyone may ask (USAGE on the
-- engine schema is still needed, which df.grant_usage gives)
grant execute on function @engine@._cap_check_v1(text) to public;
-- df.grant_usage (SECURITY INVOKER) asks whether a role's runner is in place; a catalog read
grant execute on function @engine@._runner_ok_v1(oid), @engine@._runner_body_v1(),
    @engine@._runner_body_schema3_v1(), @engine@._runner_ddl_v1(regrole, text),
    @engine@._runner_next_ok_v1(oid), @engine@._runner_next_body_v1(),
    @engine@._runner_next_ddl_v1(regrole, text) to public;
