-- Schema version 5 -> 6.

-- == df.foreach (docs/foreach.md): the FOREACH node type, its tables, DSL, engine and
--    triggers. Self-contained: another feature's part of 5-6.sql may stand beside it. ==
--
-- Runs as pgdurable_owner. Functions are re-made from the current schema files
-- (-- @definitions-of lines, expanded by schema.py); the new file is applied whole.

-- the node type (00_tables.sql's checks; existing rows pass, the checks only accept more)
alter table df.nodes
    drop constraint nodes_type_check,
    add constraint nodes_type_check check (node_type in ('SQL', 'THEN', 'IF', 'LOOP', 'JOIN', 'RACE',
        'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'RETRY',
        'FOREACH')),
    drop constraint nodes_structure_check,
    add constraint nodes_structure_check check (
        case
            when node_type in ('SQL', 'SLEEP', 'WAIT_SCHEDULE', 'BREAK', 'HTTP', 'HTTP_MULTIPART',
                               'SIGNAL', 'FOREACH')
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

-- the tables (as 00_tables.sql has them)
-- df.foreach (docs/foreach.md): a FOREACH activation whose rows query ran (its gen: a loop's
-- next iteration is a new activation and runs the query again; df.restart moves the rows to
-- the node's new activation, 38_foreach.sql), and one row per row of the query, numbered 1..n
-- in the order the query returned them: the child instance that runs the body for it, its
-- status ('pending' not started, 'running', 'completed', 'failed', 'cancelled'; 'restart':
-- df.restart of the parent restarts this child) and, once it ended, its result or error
-- (copied when the child ends: pruning a child loses nothing its parent needs). Gone with the
-- parent's runs row (pruned). Tenants hold no privilege on them (like every engine table);
-- RLS keeps each row to its owner besides.
create table @engine@.foreach_runs (
    instance_id  varchar(8)  not null
        references @engine@.runs (instance_id) on delete cascade,
    node_id      varchar(8)  not null,
    gen          integer     not null,
    row_count    integer     not null,
    max_parallel integer     not null,
    body         jsonb       not null,  -- the body flattened as df.start stores a graph
    names        text[]      not null,  -- the parent's named results the body refers to
    label        text        not null,  -- children are labelled '<label> row <n>'
    submitted_by regrole     not null,
    created_at   timestamptz not null default now(),
    primary key (instance_id, node_id)
);
create table @engine@.foreach_items (
    instance_id  varchar(8)  not null,
    node_id      varchar(8)  not null,
    ord          integer     not null,
    item         jsonb       not null,
    child_id     varchar(8),
    status       text        not null default 'pending'
        check (status in ('pending', 'running', 'completed', 'failed', 'cancelled', 'restart')),
    result       jsonb,
    error        text,
    submitted_by regrole     not null,
    primary key (instance_id, node_id, ord),
    foreign key (instance_id, node_id)
        references @engine@.foreach_runs (instance_id, node_id) on delete cascade
);
create unique index foreach_items_child_idx on @engine@.foreach_items (child_id)
    where child_id is not null;
-- what a tick looks for: the rows not completed yet (the ones in progress, the next to start)
create index foreach_items_open_idx on @engine@.foreach_items (instance_id, node_id, status, ord)
    where status <> 'completed';
alter table @engine@.foreach_runs enable row level security;
alter table @engine@.foreach_items enable row level security;
create policy foreach_runs_owner on @engine@.foreach_runs for all
    using (submitted_by = quote_ident(current_user)::regrole)
    with check (submitted_by = quote_ident(current_user)::regrole);
create policy foreach_items_owner on @engine@.foreach_items for all
    using (submitted_by = quote_ident(current_user)::regrole)
    with check (submitted_by = quote_ident(current_user)::regrole);

-- the DSL's node types, df.start's validation (df._graph_flatten, @engine@._enqueue_v1)
-- @definitions-of 10_dsl.sql
-- @definitions-of 30_control.sql
-- df._check_refs leaves a df.foreach body's references alone
-- @definitions-of 35_references.sql
-- the new file: df.foreach, the engine's functions, the triggers
-- @include 38_foreach.sql
-- df.explain / df.instance_nodes show a FOREACH's progress; df._usage_helpers names
-- @engine@._foreach_progress_v1
-- @definitions-of 40_inspect.sql
-- df.restart: FOREACH nodes keep their rows (@engine@._restart_core_v1)
-- @definitions-of 70_restart.sql

-- tenants already granted get EXECUTE on the new helper df.instance_nodes and df.explain
-- call (with the grant option where they hold the existing helpers with it)
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
            'grant execute on function @engine@._foreach_progress_v1(pg_catalog.varchar, '
            'pg_catalog.varchar) to %s%s',
            r.role, case when r.is_grantable then ' with grant option' else '' end);
    end loop;
end;
$$;

-- == set-based checkpoints (issue #14, docs/performance.md "The checkpoint"): @engine@._apply_v2
--    and its step-session twin @engine@._step_apply_v2 checkpoint many instances in one call.
--    _apply_v1 and _step_apply_v1 stay as they are: an older serve running beside this schema
--    during a rolling upgrade still calls them. The grants file re-applied gives the step role
--    EXECUTE on the new twin and takes PUBLIC's default EXECUTE off both new functions. ==
-- (50_engine.sql's definitions: re-made by the claims' part below)

-- == Claims: fairness and rolling upgrades (docs/operating.md, "Rolling upgrade";
--    docs/reliability.md, "Floods"). Self-contained. ==
-- _claim_v2 (this package) takes a quarter of each claim from the newest due tasks;
-- _claim_v1 (older packages' workers) does the same but leaves alone the instances with a
-- node type newer than those workers (RETRY, FOREACH), found through this index
create index nodes_newer_types_idx on df.nodes (instance_id) where node_type in ('RETRY', 'FOREACH');
-- (_claim_v2's instance affinity probes @engine@.tasks_owner_idx, 00_tables.sql. Not made here:
-- pgdurable/online_indexes.py builds it CONCURRENTLY once this migration has committed,
-- since a plain CREATE INDEX on the tasks table waits for every running serve's writes while this
-- transaction holds other tables. The claim works without it, only slower.)
-- @definitions-of 50_engine.sql

-- == Per-step settings read once per batch (docs/performance.md): _role_settings_v2 returns
--    the role's other settings it applied too; _role_settings_v1 becomes its wrapper. ==
-- @definitions-of 00_tables.sql

-- == The next step of a batch in one statement: @engine@._step_reset_v1 is RESET ALL as a
--    function (made by the claims' part's definitions of 50_engine.sql above). ==

-- == One-statement loads (pgdurable/worker/cache.py): @engine@._load_v2 returns in one call what
--    _load_instance_v1, _load_nodes_v1 and _load_results_v1 return; its step-session twin
--    @engine@._step_load_v2 is behind the capability. The v1 functions stay (an older serve
--    during a rolling upgrade calls them). Both new functions come with the claims' part's
--    definitions of 50_engine.sql above; the grants file below gives the step role EXECUTE on
--    the twin and takes PUBLIC's default EXECUTE off both. ==

-- == Last, for every part above: the grants of every object, new ones included (a function
--    made after them would be executable by PUBLIC) ==
-- @include 90_grants.sql
