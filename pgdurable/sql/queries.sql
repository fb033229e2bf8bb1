-- Every query the runtime executes, by name. `@engine@` is the engine schema,
-- substituted once at load (pgdurable/queries.py). Parameters are psycopg %s placeholders.

-- name: claim
-- lease up to N runnable tasks for this worker
select instance_id, node_id, gen, kind, attempts, submitted_by::pg_catalog.oid, database, deadline, clock,
       state_version
from @engine@._claim_v2(%s, %s, %s)

-- name: load
-- an instance in one call: its row, its nodes, its named results (in the order they were
-- produced), as rows told apart by their first column (50_engine.sql, _load_v2); none when
-- there is no such instance
select * from @engine@._load_v2(%s)

-- name: load_many
-- the instances of the start tasks one claim took, in one statement (cache.py, preload): each
-- one's load rows in their order, the instance's id first
select u.id, l.*
from pg_catalog.unnest(%s::pg_catalog.varchar[]) with ordinality as u(id, n)
cross join lateral @engine@._load_v2(u.id) with ordinality as l
order by u.n, l.ordinality

-- name: step_load
-- load from a step session (after the step's statement): behind its capability
select * from @engine@._step_load_v2(%s, %s)

-- name: load_instance
-- (load_instance, load_nodes, load_results: the three reads load makes in one, as workers
-- before schema 6 make them; tests build contexts from them)
-- everything a worker needs about one instance, except its nodes; then the submitting role
-- as the worker must check it before starting the instance (docs/api.md "NULL arguments"): rolname, rolsuper,
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

-- name: step_apply_set
-- the checkpoints of a batch of steps inside its transaction: the capability, then
-- apply_set's arguments
select @engine@._step_apply_v2(%s, %s, %s, %s::pg_catalog.varchar[], %s::pg_catalog.int8[],
                               %s::pg_catalog.int4[], %s::pg_catalog.text[],
                               %s::pg_catalog.bytea[], %s::pg_catalog.varchar[],
                               %s::pg_catalog.varchar[], %s::pg_catalog.int4[],
                               %s::pg_catalog.varchar[], %s::pg_catalog.varchar[],
                               %s::pg_catalog.jsonb, %s::pg_catalog.jsonb, %s::pg_catalog.jsonb)

-- name: cap_grant
-- register a step connection's capability (its backend pid, the token's SHA-256)
select @engine@._cap_grant_v1(%s, %s, %s)

-- name: runner_ok
-- is the role's runner the engine's own (owner, SECURITY DEFINER, body)?
select @engine@._runner_ok_v1(%s::pg_catalog.oid)

-- name: runner_next_ok
-- and its next-step runner (@engine@._runner_next_ok_v1)?
select @engine@._runner_next_ok_v1(%s::pg_catalog.oid)

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

-- name: apply_set
-- the checkpoints of many instances in one call (see @engine@._apply_v2)
select @engine@._apply_v2(%s, %s, %s::pg_catalog.varchar[], %s::pg_catalog.int8[],
                          %s::pg_catalog.int4[], %s::pg_catalog.text[], %s::pg_catalog.bytea[],
                          %s::pg_catalog.varchar[], %s::pg_catalog.varchar[],
                          %s::pg_catalog.int4[], %s::pg_catalog.varchar[],
                          %s::pg_catalog.varchar[], %s::pg_catalog.jsonb, %s::pg_catalog.jsonb,
                          %s::pg_catalog.jsonb)

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
-- df._worker_epoch compatibility row (docs/api.md "Tables and views")
insert into df._worker_epoch (epoch_id) values (%s)
on conflict (epoch_id) do update set last_seen_at = now()

-- name: step_settings
-- per-step settings, all in the step's transaction (a step session: every name qualified):
-- first the submitting role's own settings (FROM: applied before the select list, so the
-- engine's below win; its search_path, the one _role_settings_v2 cannot apply itself), the
-- workflow mark, statement_timeout (the engine's limit, only ever tightened by the role),
-- then the step capability, one of the deployment-wide max_user_connections slots and the
-- step's identity; last the step's application_name, pgdurable:<instance>:<node>, for the
-- transaction only (what a DBA sees in pg_stat_activity; docs/operating.md). It returns what
-- it applied (search_path, statement_timeout, the role's other settings, and the timeout in
-- milliseconds) for step_next.
-- Parameters: capability, role, application_name, role, NULL (the deployment's
-- step_statement_timeout: read here)
select pg_catalog.set_config('search_path',
                             coalesce(r.search_path, pg_catalog.current_setting('search_path')),
                             true),
       pg_catalog.set_config('df.in_workflow', 'true', true),
       pg_catalog.set_config('statement_timeout', r.statement_timeout, true),
       @engine@._step_begin_v1(%s, %s::pg_catalog.oid),
       pg_catalog.set_config('application_name', %s, true),
       r.names, r.vals, r.statement_timeout
from @engine@._role_settings_v2(%s::pg_catalog.oid, %s::pg_catalog.text) r

-- name: step_next
-- the next step of a batch, in the same transaction, in one statement: RESET ALL (nothing the
-- last statement set survives into this one), the per-step settings again as the batch's
-- first step applied them (step_settings returned them: the catalog is read once per batch;
-- the slot and the step identity stay the batch's), then the role's runner; it arms the
-- role's statement_timeout again for the next statement (@engine@._step_next_v1 says how).
-- Parameters: the role's setting names and values, search_path, statement_timeout,
-- application_name; the role (its runner); the runner's capability, statement and result
-- bytes; the names of the statements the worker prepared in the session, which the step's
-- statement must leave alone (pgdurable/worker/wave.py, Statements; NULL: none)
select * from @engine@._step_next_v1(%s::pg_catalog.text[], %s::pg_catalog.text[],
                                     %s::pg_catalog.text, %s::pg_catalog.text,
                                     %s::pg_catalog.text, %s::pg_catalog.oid, %s::pg_catalog.text,
                                     %s::pg_catalog.text, %s::pg_catalog.int8,
                                     %s::pg_catalog.text[])

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
-- the deployment-wide pg_durable.* settings the worker reads every maintenance round (as
-- text: it parses them, naming a bad one), then the pg_durable.* names this database sets
-- (ALTER DATABASE … SET: one that goes means the service's sessions still hold its old value,
-- see @engine@.setting_db) and a fingerprint of the roles' loop settings here (a change makes
-- the worker reload the instances it holds)
select @engine@.setting_db('loop_min_interval_ms', '1000'),
       @engine@.setting_db('loop_max_iterations', '100000'),
       pg_catalog.current_database(),
       @engine@.setting_db('max_user_connections', '10'),
       @engine@.setting_db('max_instance_bytes', '268435456'),
       @engine@.setting_db('max_connections_per_role', '0'),
       @engine@.setting_db('step_statement_timeout', '0'),
       array(
           select pg_catalog.lower(pg_catalog.split_part(c.item, '=', 1))
           from pg_catalog.pg_db_role_setting s
           cross join lateral pg_catalog.unnest(s.setconfig) as c(item)
           where s.setrole = 0 and s.setdatabase = d.oid
             and pg_catalog.lower(c.item) like 'pg\_durable.%%'
           order by 1),
       (select pg_catalog.md5(coalesce(pg_catalog.string_agg(
                   s.setrole::pg_catalog.text || '/' || s.setdatabase::pg_catalog.text || '/' || c.item,
                   ',' order by s.setrole, s.setdatabase, c.item), ''))
        from pg_catalog.pg_db_role_setting s
        cross join lateral pg_catalog.unnest(s.setconfig) as c(item)
        where s.setrole <> 0 and s.setdatabase in (0, d.oid)
          and pg_catalog.lower(c.item) like 'pg\_durable.loop\_%%')
from pg_catalog.pg_database d
where d.datname = pg_catalog.current_database()

-- name: cancel_backend
-- interrupt a running step (RACE loser, cancelled instance)
select pg_cancel_backend(%s)

-- name: listen
-- wake-ups: new work, cancels, abandoned steps
listen pgdurable_work; listen pgdurable_cancel; listen pgdurable_abandon

-- name: http_privilege
-- HTTP gate 0 (docs/http.md): may the submitting role still call df.http / df.http_multipart?
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
-- in a `database =>` target: is pgdurable installed there (its runner check), and recent
-- enough for remote_step_settings?
select pg_catalog.to_regprocedure('@engine@._runner_ok_v1(oid)') is not null,
       pg_catalog.to_regprocedure('@engine@._role_settings_v1(oid,text)') is not null

-- name: remote_step_settings
-- per-step settings in another database: the role's settings there (as a session of the
-- role in that database would have them) and statement_timeout as in step_settings, but the
-- deployment's step_statement_timeout is the worker's (its own database's, passed in: the
-- target database's owner must not set the engine's limit); the capability (registered
-- there), no slot; the step's application_name. Parameters: capability, application_name,
-- role, the deployment's step_statement_timeout
select pg_catalog.set_config('search_path',
                             coalesce(r.search_path, pg_catalog.current_setting('search_path')),
                             true),
       pg_catalog.set_config('df.in_workflow', 'true', true),
       pg_catalog.set_config('statement_timeout', r.statement_timeout, true),
       @engine@._cap_check_v1(%s),
       pg_catalog.set_config('application_name', %s, true)
from @engine@._role_settings_v1(%s::pg_catalog.oid, %s::pg_catalog.text) r

-- name: still_ours
-- which of our running steps are still ours with their instance live (a NOTIFY on
-- pgdurable_cancel / pgdurable_abandon carries no ids: we ask)
select k.instance_id, k.node_id,
       exists (select 1 from @engine@.tasks t join df.instances i on i.id = t.instance_id
               where t.instance_id = k.instance_id and t.node_id = k.node_id
                 and t.lease_owner = %s
                 and i.status not in ('completed', 'failed', 'cancelled'))
from pg_catalog.unnest(%s::pg_catalog.text[], %s::pg_catalog.text[]) as k(instance_id, node_id)

-- name: foreach_tick
-- one tick of a FOREACH task (df.foreach, 38_foreach.sql): (state, detail)
select state, detail from @engine@._foreach_tick_v1(%s, %s, %s, %s)

-- name: foreach_cancel
-- cancel the running bodies of a FOREACH; how many were busy (try again)
select @engine@._foreach_cancel_v1(%s, %s, %s)

-- name: foreach_reap
-- running bodies of FOREACHs that stopped, cancelled (the maintenance round)
select @engine@._foreach_reap_v1(%s)
