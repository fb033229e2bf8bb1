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
select i.label, i.status, i.submitted_by::pg_catalog.oid, i.submitted_by::pg_catalog.text, i.database, i.root_node,
       r.vars, r.state, r.state_version, r.cancel_reason,
       ro.rolname, ro.rolsuper, ro.rolcanlogin,
       coalesce(@engine@.setting('enable_superuser_instances', 'off') in ('on', 'true', '1'),
                false)
from df.instances i join @engine@.runs r on r.instance_id = i.id
left join pg_catalog.pg_roles ro on ro.oid = i.submitted_by::pg_catalog.oid
where i.id = %s

-- name: load_nodes
-- the stored graph and the latest outcome of every node
select id, node_type, query, result_name, left_node, right_node, status, result, status_details
from df.nodes where instance_id = %s

-- name: load_results
-- the instance's named results in the order they were produced
select name, value from @engine@.results where instance_id = %s order by seq

-- name: apply
-- one checkpoint (see @engine@._apply_v1 for the return codes, the last column). After a
-- step's statement, in its transaction, whatever that statement did to the session: this
-- query names only qualified objects, and pins search_path to pg_catalog for the queries
-- after it (the first column)
select pg_catalog.set_config('search_path', 'pg_catalog', true),
       @engine@._apply_v1(%s, %s, %s, %s, %s, %s, %s, %s::pg_catalog.jsonb,
                          %s::pg_catalog.jsonb, %s, %s::pg_catalog.jsonb, %s)

-- name: release
-- give a leased task back (infrastructure error, shutdown); NULL instance = all of ours
select @engine@._release_v1(%s, %s, %s)

-- name: rescue
-- clear expired leases, bounded
select @engine@._rescue_v1(%s)

-- name: extend
-- keep our leases alive while steps run
select @engine@._extend_v1(%s, %s, %s, %s)

-- name: runner
-- the submitting role's step runner, created on first use
select @engine@._runner_v1(%s::pg_catalog.oid::pg_catalog.regrole)

-- name: heartbeat
-- this process is alive
select @engine@._heartbeat_v1(%s, %s, %s, %s, %s, %s)

-- name: epoch
-- df._worker_epoch compatibility row (SPEC §2)
insert into df._worker_epoch (epoch_id) values (%s)
on conflict (epoch_id) do update set last_seen_at = now()

-- name: step_settings
-- per-step settings (marks the session as a workflow, bounds the statement) and one of the
-- deployment-wide max_user_connections slots, all in the step's transaction
select pg_catalog.set_config('df.in_workflow', 'true', true),
       pg_catalog.set_config('statement_timeout',
                             @engine@.setting('step_statement_timeout', '0'), true),
       @engine@._step_slot_v1(%s),
       @engine@._step_begin_v1(%s)

-- name: step_next
-- the next step of a batch, in the same transaction, after a RESET ALL (nothing the last
-- statement set to the session survives into it): the per-step settings again (the slot and
-- the step identity stay the batch's)
select pg_catalog.set_config('df.in_workflow', 'true', true),
       pg_catalog.set_config('statement_timeout',
                             @engine@.setting('step_statement_timeout', '0'), true)

-- name: reset_session
-- before a step connection goes back to the pool: nothing a step set (GUCs incl. search_path,
-- temp objects, prepared statements, cursors, advisory locks, LISTENs) survives into the next
-- step or the service. DISCARD ALL minus DISCARD PLANS: dropping every cached plan made each
-- step re-plan the engine's plpgsql functions (most of PostgreSQL's CPU per step); plans
-- are keyed by search_path, which RESET ALL restores, so keeping them is safe.
reset role; reset all; discard temp; discard sequences; close all; deallocate all; unlisten *;
select pg_catalog.pg_advisory_unlock_all()

-- name: prune
-- retention: delete a batch of old terminal instances (one worker at a time)
select case when pg_try_advisory_xact_lock(1346913362)
            then @engine@._prune_v1(%s) else 0 end

-- name: settings
-- workflow settings the worker reads (pg_durable.*)
select @engine@.setting('loop_min_interval_ms', '1000')::pg_catalog.int4,
       @engine@.setting('loop_max_iterations', '100000')::pg_catalog.int4,
       current_database(),
       @engine@.setting('max_user_connections', '10')::pg_catalog.int4

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
-- consume the oldest signal of a name (FIFO); no row = none waiting (data may be JSON null)
with oldest as (
    select s.id from @engine@.signals s
    where s.instance_id = %s and s.name = %s
    order by s.id
    limit 1
    for update skip locked
)
delete from @engine@.signals s using oldest where s.id = oldest.id
returning s.data

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

-- name: runner_ddl
-- the CREATE FUNCTION text of a role's step runner, for another database
select @engine@._runner_ddl_v1(%s::pg_catalog.oid::pg_catalog.regrole, '@engine@_exec'),
       has_database_privilege(%s::pg_catalog.oid, %s, 'CONNECT')

-- name: remote_exec_schema
-- the runner schema in another database (nobody but the service may use it)
create schema if not exists @engine@_exec

-- name: remote_runner_exists
-- does the role's runner exist in this (other) database
select exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname = '@engine@_exec' and p.proname = 'step_' || %s::pg_catalog.text)

-- name: remote_step_settings
-- per-step settings in another database (no engine there: plain set_config)
select set_config('df.in_workflow', 'true', true)

-- name: still_ours
-- is this running step still ours and its instance live (NOTIFY can be sent by anyone)
select exists (select 1 from @engine@.tasks t join df.instances i on i.id = t.instance_id
               where t.instance_id = %s and t.node_id = %s and t.lease_owner = %s
                 and i.status not in ('completed', 'failed', 'cancelled'))

-- name: autocommit_role
-- a maintenance step (VACUUM, CREATE INDEX CONCURRENTLY, …) runs outside any transaction,
-- so outside the runner: as the submitting role, marked as a workflow session
select pg_catalog.set_config('role', r.rolname, false),
       pg_catalog.set_config('df.in_workflow', 'true', false),
       pg_catalog.set_config('statement_timeout',
                             @engine@.setting('step_statement_timeout', '0'), false)
from pg_catalog.pg_roles r where r.oid = %s
