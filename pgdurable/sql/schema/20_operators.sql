-- pgdurable schema, part 20: the seven DSL operators (docs/api.md "Operators", docs/api.md "NULL arguments").
--
-- Plain CREATE OPERATOR on text operands, so they parse exactly as in pg_durable. They live
-- in @opschema@: pg_catalog when a superuser installs (they then resolve under any
-- search_path, as the original's do), else public (or --operator-schema). The functions stay
-- in df; dropping df (uninstall) drops the operators with them.
--
-- Precedence: PostgreSQL gives every user-defined operator the same level (the generic
-- operator level, shared with ||), left-associative; tighter than comparisons, IS, NOT,
-- AND, OR; looser than arithmetic and ::. The prefix @> takes only the next operand. So
--   a ~> b & c          = (a ~> b) & c
--   @> a ~> b           = (@> a) ~> b          (b runs after an infinite loop: never)
--   p ~> c ?> t !> e    = ((p ~> c) ?> t) !> e  (works: the THEN yields c's result)
--   c ?> a ~> b !> e    raises: (c ?> a) is a partial, which ~> refuses; write c ?> (a ~> b) !> e
-- The operand types name pg_catalog: they are resolved once, here, under the installing
-- session's search_path (where a temp type called text would otherwise come first).
-- None of the seven clashes with a pg_catalog operator on text (checked on PG 15 and 18;
-- tests/sql/test_operators.py keeps checking). & and | exist for integer, bit and inet
-- types; with two untyped literals ('…' & '…') PostgreSQL prefers the string category, so
-- these resolve to the text versions here.

create operator @opschema@.~> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.seq);
comment on operator @opschema@.~> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: a then b (df.seq)';

create operator @opschema@.|=> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.as_op);
comment on operator @opschema@.|=> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: name a result (df.as)';

create operator @opschema@.& (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df."join");
comment on operator @opschema@.& (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: run both, await all (df.join)';

create operator @opschema@.| (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.race);
comment on operator @opschema@.| (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: run both, first wins (df.race)';

create operator @opschema@.?> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.if_then_op);
comment on operator @opschema@.?> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: condition ?> then_branch, completed by !> (df.if_then_op)';

create operator @opschema@.!> (leftarg = pg_catalog.text, rightarg = pg_catalog.text,
                            function = df.if_else_op);
comment on operator @opschema@.!> (pg_catalog.text, pg_catalog.text)
    is 'pg_durable DSL: (condition ?> then_branch) !> else_branch (df.if)';

create operator @opschema@.@> (rightarg = pg_catalog.text, function = df.loop_op);
comment on operator @opschema@.@> (none, pg_catalog.text)
    is 'pg_durable DSL: infinite loop (df.loop)';
