-- Schema version 3 -> 4 (pgdurable 0.4): correctness and pg_durable compatibility.
--
-- Runs as pgdurable_owner (the owner of every object since version 3). Functions are re-made
-- from the current schema files (-- @definitions-of lines, expanded by schema.py); a function
-- whose argument list or result type changed is dropped first (CREATE OR REPLACE cannot
-- change either).

-- == functions whose signature or result type changed (dropped, re-made below) ==

-- == tables ==

-- @definitions-of 00_tables.sql
-- @definitions-of 10_dsl.sql
-- @include 35_references.sql
-- @definitions-of 30_control.sql
-- @definitions-of 40_inspect.sql
-- @definitions-of 50_engine.sql
-- @include 60_schedules.sql
-- @include 90_grants.sql
