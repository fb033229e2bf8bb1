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
-- defines. 22023, as the other graph errors. Not for a df.foreach body (df._foreach_flatten
-- sets pgdurable.foreach_body for the call): it refers to $item and to the names of the
-- workflow it runs in, which it does not define.
create function df._check_refs(p_nodes jsonb) returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_names pg_catalog.text[];
    v_node  pg_catalog.jsonb;
    v_ref   pg_catalog.text;
begin
    if pg_catalog.current_setting('pgdurable.foreach_body', true) = 'on' then
        return;
    end if;
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
