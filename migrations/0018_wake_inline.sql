-- relay.wake() is one SQL expression that the capture triggers' call inlines.
--
-- Every captured row runs `PERFORM relay.wake()` in its capture trigger. As a PL/pgSQL function it
-- cost each row a function call (a new SPI context and memory context) and an executor run of
-- `SELECT last_value FROM relay.wakeup_armed` (a scan of the sequence's one row): a profile of 8
-- writers committing 1-row INSERTs showed a fifth of the capture trigger's time in it
-- (docs/benchmarks.md). A LANGUAGE sql function whose body is a single expression, with no SET
-- clause and not SECURITY DEFINER, is inlined by the planner into the statement that calls it, so
-- the trigger's cached `SELECT relay.wake()` evaluates the expression directly; the flag is read
-- with pg_sequence_last_value(), which opens the sequence without an executor (it needs the SELECT
-- privilege that migration 0017 granted to every role, and gives NULL for a sequence never set,
-- which is armed: the sequence starts at 1). What it does is unchanged:
-- - `relay.writer_notify = 'off'`: never notifies;
-- - `relay.writer_notify = 'on'`: always notifies;
-- - otherwise: notifies while a sequencer is armed (the flag is 1);
-- and never when the NOTIFY queue is half full. The functions it calls are schema-qualified, as a
-- function without `SET search_path` must be. The capture triggers, which call relay.wake() by
-- name, are unchanged. connector/tests/wakeup.rs checks that the call is inlined.

CREATE OR REPLACE FUNCTION relay.wake() RETURNS void
LANGUAGE sql VOLATILE SECURITY INVOKER AS $$
SELECT CASE
    WHEN coalesce(pg_catalog.current_setting('relay.writer_notify', true), '') = 'off' THEN NULL
    WHEN coalesce(pg_catalog.current_setting('relay.writer_notify', true), '') <> 'on'
         AND coalesce(pg_catalog.pg_sequence_last_value('relay.wakeup_armed'::regclass), 1) = 0
        THEN NULL
    WHEN pg_catalog.pg_notification_queue_usage() < 0.5 THEN pg_catalog.pg_notify('relay_changes', '')
END
$$;
