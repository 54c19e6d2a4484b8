-- relay.wake() runs with the writer's own privileges.
--
-- Every captured row calls relay.wake() from its capture trigger. Migration 0007 made it SECURITY
-- DEFINER with `SET search_path`, so that a writer's role needed no privilege on the wake-up flag;
-- but a function with a SET clause saves and restores the setting, and a SECURITY DEFINER one
-- switches the user, on every call: about 6 µs of the writer's CPU per row, a fifth of what the
-- capture trigger costs (docs/benchmarks.md). Reading the flag is harmless, so every role may read
-- it instead, and the function runs as its caller: a role that can write through the capture
-- triggers (USAGE on schema relay, INSERT on relay.changelog) can still wake the connectors. Without
-- SECURITY DEFINER, the caller's search_path cannot lend anyone else's privileges. The body is
-- unchanged, so the capture triggers (which call relay.wake() by name) stay as they are.

GRANT SELECT ON SEQUENCE relay.wakeup_armed TO PUBLIC;

CREATE OR REPLACE FUNCTION relay.wake() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
DECLARE
    mode text := coalesce(current_setting('relay.writer_notify', true), '');
BEGIN
    IF mode = 'off' THEN
        RETURN;
    END IF;
    IF mode <> 'on' AND (SELECT last_value FROM relay.wakeup_armed) = 0 THEN
        RETURN;
    END IF;
    IF pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_changes', '');
    END IF;
END
$$;
