-- The sequencer walks the changelog only by its primary key, never by a sequential scan.
--
-- relay.changelog is a queue: every batch deletes what it moved, so between autovacuum runs it holds
-- thousands of dead rows. Two statements of relay.sequence_batch() (migrations 0007 and 0016) let the
-- planner choose a sequential scan, and it did: a profile of the whole system (8 writers committing
-- 1-row INSERTs, trigger mode, docs/benchmarks.md) found about a third of the sequencer's database
-- time in sequential scans of the changelog, walking every dead row:
-- - the "anything to move?" guard was `NOT EXISTS (...)`, which the planner costs as "stop at the
--   first match", so with statistics that promise many matches (the generic plan, or statistics
--   taken while changes were pending) a sequential scan looks cheapest, and then reads the whole
--   table when nothing matches;
-- - the batch's DELETE joined the changelog to the batch, which the planner may run as a hash join
--   over a sequential scan.
-- Now the guard asks for the first key in key order (`ORDER BY xid, id LIMIT 1`, which EXISTS would
-- have discarded), and the DELETE names the batch's key range, (last moved key, batch's last key]:
-- every row in that range is in the batch (its xid is at most the batch's last xid, so below the
-- horizon, and the batch is the first rows in key order), so it deletes the same rows as before,
-- by an index range scan. Everything else, and the function's signature, is unchanged.
-- connector/tests/sequencer_scans.rs checks that neither path reads pages in proportion to the dead
-- rows.

CREATE OR REPLACE FUNCTION relay.sequence_batch(
    batch_size integer DEFAULT 1000, arm boolean DEFAULT false,
    OUT moved integer, OUT busy boolean, OUT armed boolean, OUT last_seq bigint
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon xid8;
    from_xid xid8;
    from_id bigint;
    is_armed boolean;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('relay.sequence_changes')) THEN
        moved := -1;
        busy := true;
        armed := false;
        SELECT s.last_seq INTO last_seq FROM relay.sequencer s;
        RETURN;
    END IF;
    SELECT h.horizon, h.busy INTO horizon, busy FROM relay.horizon_of_database() h;
    SELECT s.last_xid, s.last_id, s.last_seq INTO from_xid, from_id, last_seq FROM relay.sequencer s;
    SELECT last_value = 1 INTO is_armed FROM relay.wakeup_armed;
    PERFORM FROM relay.changelog c
    WHERE (c.xid, c.id) > (from_xid, from_id) AND c.xid < horizon
    ORDER BY c.xid, c.id
    LIMIT 1;
    IF NOT FOUND THEN
        moved := 0;
        IF arm AND NOT busy AND NOT is_armed THEN
            PERFORM setval('relay.wakeup_armed', 1);
            is_armed := true;
        END IF;
        armed := is_armed;
        RETURN;
    END IF;
    IF is_armed THEN
        PERFORM setval('relay.wakeup_armed', 0);
    END IF;
    armed := false;
    WITH batch AS MATERIALIZED (
        SELECT c.xid, c.id, c.channel, c.data, c.info, c.written_at,
               row_number() OVER (ORDER BY c.xid, c.id) AS grn,
               row_number() OVER (PARTITION BY c.channel ORDER BY c.xid, c.id) AS rn
        FROM (
            SELECT * FROM relay.changelog l
            WHERE (l.xid, l.id) > (from_xid, from_id) AND l.xid < horizon
            ORDER BY l.xid, l.id
            LIMIT batch_size
        ) c
    ), counts AS (
        SELECT channel, count(*) AS n FROM batch GROUP BY channel
    ), moved_tops AS (
        UPDATE relay.channels ch SET top_offset = ch.top_offset + c.n, updated_at = now()
        FROM counts c WHERE ch.name = c.channel
        RETURNING ch.name, ch.epoch, ch.top_offset
    ), new_tops AS (
        INSERT INTO relay.channels AS ch (name, epoch, top_offset, updated_at)
        SELECT c.channel, relay.new_epoch(), c.n, now() FROM counts c
        WHERE NOT EXISTS (SELECT 1 FROM moved_tops m WHERE m.name = c.channel)
        ON CONFLICT (name) DO UPDATE
            SET top_offset = ch.top_offset + EXCLUDED.top_offset, updated_at = now()
        RETURNING name, epoch, top_offset
    ), tops AS (
        SELECT name, epoch, top_offset FROM moved_tops
        UNION ALL
        SELECT name, epoch, top_offset FROM new_tops
    ), last_key AS (
        SELECT b.xid, b.id FROM batch b ORDER BY b.grn DESC LIMIT 1
    ), base AS (
        UPDATE relay.sequencer s
        SET last_seq = s.last_seq + (SELECT count(*) FROM batch),
            last_xid = (SELECT k.xid FROM last_key k),
            last_id = (SELECT k.id FROM last_key k)
        RETURNING s.last_seq - (SELECT count(*) FROM batch) AS seq0
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
        DELETE FROM relay.changelog l
        WHERE (l.xid, l.id) > (from_xid, from_id)
          AND (l.xid, l.id) <= ((SELECT k.xid FROM last_key k), (SELECT k.id FROM last_key k))
    )
    SELECT count(*)::integer INTO moved FROM moved_rows;
    last_seq := last_seq + moved;
    -- Wake the other nodes' readers, unless the NOTIFY queue is half full (their poll timers cover a
    -- skipped wake-up). Writers no longer notify while changes flow, so this lock is uncontended.
    IF moved > 0 AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_publications', '');
    END IF;
END
$$;
