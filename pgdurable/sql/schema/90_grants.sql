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
