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
