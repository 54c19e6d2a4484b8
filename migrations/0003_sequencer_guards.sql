-- The sequencer, revised: an idle call returns before writing anything, and its own wake-up NOTIFY
-- is skipped when the NOTIFY queue is half full (as relay.wake() does for writers), so a stalled
-- listener elsewhere in the cluster can never make sequencing fail.

CREATE OR REPLACE FUNCTION relay.sequence_changes(batch_size integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon xid8;
    moved integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('relay.sequence_changes'));
    horizon := pg_snapshot_xmin(pg_current_snapshot());
    -- Nothing to move: return without writing (an idle node must not commit a write per poll).
    IF NOT EXISTS (SELECT 1 FROM relay.changelog WHERE xid < horizon) THEN
        RETURN 0;
    END IF;

    WITH batch AS MATERIALIZED (
        SELECT c.xid, c.id, c.channel, c.data, c.info, c.written_at,
               row_number() OVER (ORDER BY c.xid, c.id) AS grn,
               row_number() OVER (PARTITION BY c.channel ORDER BY c.xid, c.id) AS rn
        FROM (
            SELECT * FROM relay.changelog
            WHERE xid < horizon
            ORDER BY xid, id
            LIMIT batch_size
        ) c
    ), counts AS (
        SELECT channel, count(*) AS n FROM batch GROUP BY channel
    ), tops AS (
        INSERT INTO relay.channels AS ch (name, epoch, top_offset, updated_at)
        SELECT channel, relay.new_epoch(), n, now() FROM counts
        ON CONFLICT (name) DO UPDATE
            SET top_offset = ch.top_offset + EXCLUDED.top_offset, updated_at = now()
        RETURNING name, epoch, top_offset
    ), base AS (
        UPDATE relay.sequencer SET last_seq = last_seq + (SELECT count(*) FROM batch)
        RETURNING last_seq - (SELECT count(*) FROM batch) AS seq0
    ), moved_rows AS (
        INSERT INTO relay.publications (seq, channel, "offset", epoch, data, info, written_at)
        SELECT base.seq0 + b.grn, b.channel, t.top_offset - c.n + b.rn, t.epoch, b.data, b.info,
               b.written_at
        FROM batch b
        JOIN counts c ON c.channel = b.channel
        JOIN tops t ON t.name = b.channel
        CROSS JOIN base
        RETURNING 1
    ), deleted AS (
        DELETE FROM relay.changelog l USING batch b WHERE l.xid = b.xid AND l.id = b.id
    )
    SELECT count(*) INTO moved FROM moved_rows;

    -- Wake the other nodes, unless the NOTIFY queue is half full: a full queue would make this
    -- commit fail and stop the whole stream; the nodes' poll timers cover a skipped wake-up.
    IF moved > 0 AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_publications', '');
    END IF;
    RETURN moved;
END
$$;
