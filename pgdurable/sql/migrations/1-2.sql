-- Schema version 1 -> 2 (pgdurable 0.2): the executor's SQL step batches.
--
-- _extend_v1 skips task rows locked by a checkpoint in progress (a batch of steps holds
-- several until it commits; waiting on them while holding others could deadlock), and
-- _step_slot_v1 waits on a taken slot's lock instead of polling with pg_sleep(0.05).
-- _claim_v1 leaves the runnable steps of an instance to the worker that is running other
-- steps of it (instance affinity: no checkpoint races and reloads between workers).
-- All keep their signatures: workers of version 1 and 2 can run side by side.

create or replace function @engine@._extend_v1(p_owner text, p_lease_seconds integer,
                                    p_instances text[], p_nodes text[])
returns integer
language sql volatile
set search_path = pg_catalog
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
    select count(*)::integer from upd
$$;

create or replace function @engine@._step_slot_v1(p_role oid)
returns integer
language plpgsql volatile
set search_path = pg_catalog
set lock_timeout = '100ms'
as $$
declare
    v_max      integer := @engine@.setting('max_user_connections', '10')::integer;
    v_role_max integer := @engine@.setting('max_connections_per_role', '0')::integer;
    v_timeout  integer := @engine@.setting('execution_acquire_timeout', '30')::integer;
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => v_timeout);
    v_start    integer := floor(random() * v_max)::integer;
    v_got      integer;
    v_role_ok  boolean := v_role_max <= 0;
begin
    loop
        if not v_role_ok then
            -- per-role slots: key hash((role oid << 16) + slot) in their own key space PGDV
            for i in 0 .. v_role_max - 1 loop
                if pg_try_advisory_xact_lock(1346913366, hashint8((p_role::bigint << 16) + i)) then
                    v_role_ok := true;
                    exit;
                end if;
            end loop;
        end if;
        if v_role_ok then
            for i in 0 .. v_max - 1 loop
                if pg_try_advisory_xact_lock(1346913365, (v_start + i) % v_max) then
                    return (v_start + i) % v_max;
                end if;
            end loop;
        end if;
        if clock_timestamp() >= v_deadline then
            if not v_role_ok then
                raise exception 'connection limit reached: all max_connections_per_role=% step '
                                'slots of role % stayed busy for execution_acquire_timeout=%s',
                                v_role_max, p_role::regrole, v_timeout
                    using errcode = '53300',
                          hint = 'raise pg_durable.max_connections_per_role or lower the fan-out';
            end if;
            raise exception 'connection limit reached: all max_user_connections=% step slots '
                            'stayed busy for execution_acquire_timeout=%s', v_max, v_timeout
                using errcode = '53300',
                      hint = 'raise pg_durable.max_user_connections or lower the fan-out';
        end if;
        if v_role_ok then
            -- every slot is taken: wait on one (woken the moment its holder commits, not
            -- after a fixed sleep), at most lock_timeout, then look at all of them again
            begin
                perform pg_advisory_xact_lock(1346913365, v_start);
                return v_start;
            exception when lock_not_available then
                v_start := (v_start + 1) % v_max;
            end;
        else
            perform pg_sleep(0.05);
        end if;
    end loop;
end
$$;

create or replace function @engine@._claim_v1(p_owner text, p_limit integer, p_lease_seconds integer)
returns table (instance_id varchar, node_id varchar, gen integer, kind text, attempts integer,
               submitted_by regrole, database text, deadline timestamptz, clock timestamptz,
               state_version bigint)
language sql volatile
set search_path = pg_catalog
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
