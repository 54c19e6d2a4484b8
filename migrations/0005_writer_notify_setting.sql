-- The NOTIFY that wakes the connectors takes PostgreSQL's cluster-wide notify lock at commit, which
-- serializes every notifying writer (docs/benchmarks.md: writers run at about 0.34 of their no-trigger
-- throughput with it, 0.76 without). Deployments that value write throughput over the last milliseconds
-- of latency can turn it off per database or role:
--
--     ALTER DATABASE app SET relay.writer_notify = 'off';   -- new sessions pick it up
--
-- and lower the connectors' `stream.poll_interval_ms` instead (e.g. 20–50 ms).

CREATE OR REPLACE FUNCTION relay.wake() RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF coalesce(current_setting('relay.writer_notify', true), '') <> 'off'
       AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_changes', '');
    END IF;
END
$$;
