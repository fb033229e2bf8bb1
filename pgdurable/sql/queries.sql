-- Every query the runtime executes, by name (STYLE B1). `@engine@` is the engine schema,
-- substituted once at load (pgdurable/queries.py). Parameters are psycopg %s placeholders.

-- name: claim
-- lease up to N runnable tasks for this worker
select instance_id, node_id, gen, kind, attempts, submitted_by::pg_catalog.oid, database, deadline, clock,
       state_version
from @engine@._claim_v1(%s, %s, %s)

-- name: load_instance
-- everything a worker needs about one instance, except its nodes; then the submitting role
-- as the worker must check it before starting the instance (SPEC §9): rolname, rolsuper,
-- rolcanlogin (null when the role is gone), superuser instances enabled
select * from @engine@._load_instance_v1(%s)

-- name: load_nodes
-- the stored graph and the latest outcome of every node
select * from @engine@._load_nodes_v1(%s)

-- name: load_results
-- the instance's named results in the order they were produced
select * from @engine@._load_results_v1(%s)

-- name: step_load_instance
-- load_instance from a step session (after the step's statement): behind its capability
select * from @engine@._step_load_instance_v1(%s, %s)

-- name: step_load_nodes
select * from @engine@._step_load_nodes_v1(%s, %s)

-- name: step_load_results
select * from @engine@._step_load_results_v1(%s, %s)

-- name: step_lock_run
select @engine@._step_lock_run_v1(%s, %s)

-- name: step_apply
-- the checkpoint inside a step transaction: the capability, then apply's arguments
select @engine@._step_apply_v1(%s, %s, %s, %s, %s, %s, %s, %s, %s::pg_catalog.jsonb,
                               %s::pg_catalog.jsonb, %s::pg_catalog.text[],
                               %s::pg_catalog.jsonb, %s)

-- name: cap_grant
-- register a step connection's capability (its backend pid, the token's SHA-256)
select @engine@._cap_grant_v1(%s, %s, %s)

-- name: runner_ok
-- is the role's runner the engine's own (owner, SECURITY DEFINER, body)?
select @engine@._runner_ok_v1(%s::pg_catalog.oid)

-- name: slots_ensure
-- the step slot rows up to the current settings (NULL: every role with queued work)
select @engine@._slots_ensure_v1(%s::pg_catalog.oid)

-- name: fail_instance
-- a task over the attempts cap (a start included): fail its instance with the reason
select @engine@._fail_instance_v1(%s, %s, %s, %s)

-- name: apply
-- one checkpoint on a service connection (see @engine@._apply_v1 for the return codes)
select @engine@._apply_v1(%s, %s, %s, %s, %s, %s, %s, %s::pg_catalog.jsonb,
                          %s::pg_catalog.jsonb, %s::pg_catalog.text[], %s::pg_catalog.jsonb, %s)

-- name: release
-- give a leased task back (infrastructure error, shutdown); NULL instance = all of ours
select @engine@._release_v1(%s, %s, %s)

-- name: rescue
-- clear expired leases, bounded
select @engine@._rescue_v1(%s)

-- name: extend
-- keep our leases alive while steps run
select @engine@._extend_v1(%s, %s, %s, %s)

-- name: heartbeat
-- this process is alive
select @engine@._heartbeat_v1(%s, %s, %s, %s, %s, %s)

-- name: epoch
-- df._worker_epoch compatibility row (SPEC §2)
insert into df._worker_epoch (epoch_id) values (%s)
on conflict (epoch_id) do update set last_seen_at = now()

-- name: step_settings
-- per-step settings (marks the session as a workflow, bounds the statement), then the step
-- capability, one of the deployment-wide max_user_connections slots and the step's identity,
-- all in the step's transaction (a step session: every name qualified); last the step's
-- application_name, pgdurable:<instance>:<node>, for the transaction only (what a DBA sees
-- in pg_stat_activity; docs/operating.md)
select pg_catalog.set_config('df.in_workflow', 'true', true),
       pg_catalog.set_config('statement_timeout',
                             @engine@.setting('step_statement_timeout', '0'), true),
       @engine@._step_begin_v1(%s, %s::pg_catalog.oid),
       pg_catalog.set_config('application_name', %s, true)

-- name: step_next
-- the next step of a batch, in the same transaction, after a RESET ALL (nothing the last
-- statement set to the session survives into it): the per-step settings again (the slot and
-- the step identity stay the batch's)
select pg_catalog.set_config('df.in_workflow', 'true', true),
       pg_catalog.set_config('statement_timeout',
                             @engine@.setting('step_statement_timeout', '0'), true),
       pg_catalog.set_config('application_name', %s, true)

-- name: reset_session
-- before a step connection goes back to the pool: nothing a step set (GUCs incl. search_path,
-- temp objects, prepared statements, cursors, advisory locks, LISTENs) survives into the next
-- step. DISCARD ALL minus DISCARD PLANS: dropping every cached plan made each step re-plan
-- the engine's plpgsql functions (most of PostgreSQL's CPU per step); the engine's functions
-- pin search_path to pg_catalog, pg_temp and qualify every other name, so a tenant's temp
-- object can never be what one of their plans points at. The worker appends a setseed() with
-- a fresh random value: a seed a step set must not make the next step's random() guessable.
reset role; reset all; discard temp; discard sequences; close all; deallocate all; unlisten *;
select pg_catalog.pg_advisory_unlock_all()

-- name: prune
-- retention: delete a batch of old terminal instances (one worker at a time)
select @engine@._prune_v1(%s)

-- name: settings
-- workflow settings the worker reads (pg_durable.*)
select @engine@.setting('loop_min_interval_ms', '1000')::pg_catalog.int4,
       @engine@.setting('loop_max_iterations', '100000')::pg_catalog.int4,
       current_database(),
       @engine@.setting('max_user_connections', '10')::pg_catalog.int4,
       @engine@.setting('max_instance_bytes', '268435456')::pg_catalog.int8,
       @engine@.setting('max_connections_per_role', '0')::pg_catalog.int4

-- name: cancel_backend
-- interrupt a running step (RACE loser, cancelled instance)
select pg_cancel_backend(%s)

-- name: listen
-- wake-ups: new work, cancels, abandoned steps
listen pgdurable_work; listen pgdurable_cancel; listen pgdurable_abandon

-- name: http_privilege
-- HTTP gate 0 (SPEC §3.8): may the submitting role still call df.http / df.http_multipart?
-- NULL (false) when the role no longer exists
select case when exists (select 1 from pg_roles r where r.oid = %s::pg_catalog.oid)
            then has_function_privilege(%s::pg_catalog.oid, %s, 'execute') end

-- name: take_signal_row
-- consume the oldest signal of a name (FIFO); no row = none waiting (data may be JSON null).
-- Returns (data as JSON text, or NULL when it is over the byte limit given, ≤ 0 = none; its
-- size): oversized data never reaches the worker's memory, the step fails saying so
with oldest as (
    select s.id from @engine@.signals s
    where s.instance_id = %s and s.name = %s
    order by s.id
    limit 1
    for update skip locked
), taken as (
    delete from @engine@.signals s using oldest where s.id = oldest.id
    returning s.data::pg_catalog.text as data
)
select case when pg_catalog.octet_length(t.data) <= %s then t.data end,
       pg_catalog.octet_length(t.data)
from taken t

-- name: lock_run
-- the instance's runs row, locked first like every writer of an instance
select 1 from @engine@.runs where instance_id = %s for update

-- name: park_signal
-- a signal wait found nothing: sleep until its deadline or the next df.signal, unless a
-- signal of ITS name is waiting (signals of other names must not keep it awake); returns
-- (parked, a signal of that name is waiting)
with upd as (
    update @engine@.tasks t
    set lease_owner = null, lease_expires_at = null,
        due_at = coalesce(t.deadline, 'infinity'::pg_catalog.timestamptz)
    where t.lease_owner = %s and t.instance_id = %s and t.node_id = %s
      and not exists (select 1 from @engine@.signals s
                      where s.instance_id = t.instance_id and s.name = %s)
    returning t.instance_id
)
select exists (select 1 from upd),
       exists (select 1 from @engine@.signals s, (select %s::pg_catalog.varchar as i, %s::pg_catalog.text as n) k
               where s.instance_id = k.i and s.name = k.n)

-- name: remote_engine_present
-- in a `database =>` target: is pgdurable installed there (its runner check)?
select pg_catalog.to_regprocedure('@engine@._runner_ok_v1(oid)') is not null

-- name: remote_step_settings
-- per-step settings in another database: the capability (registered there), no slot; the
-- step's application_name as in step_settings
select pg_catalog.set_config('df.in_workflow', 'true', true),
       @engine@._cap_check_v1(%s),
       pg_catalog.set_config('application_name', %s, true)

-- name: still_ours
-- which of our running steps are still ours with their instance live (a NOTIFY on
-- pgdurable_cancel / pgdurable_abandon carries no ids: we ask)
select k.instance_id, k.node_id,
       exists (select 1 from @engine@.tasks t join df.instances i on i.id = t.instance_id
               where t.instance_id = k.instance_id and t.node_id = k.node_id
                 and t.lease_owner = %s
                 and i.status not in ('completed', 'failed', 'cancelled'))
from pg_catalog.unnest(%s::pg_catalog.text[], %s::pg_catalog.text[]) as k(instance_id, node_id)
