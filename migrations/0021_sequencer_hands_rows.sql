-- The node that sequences a batch hands it to its own reader instead of reading it back.
--
-- relay.sequence_batch() moved a batch of changes into relay.publications and returned how many; the
-- node's reader then read the same rows back from relay.publications (`seq > cursor`). Measured with
-- bench/cpu_by_process.py (docs/benchmarks.md), that read cost the database as much CPU as the
-- sequencing itself: 7.4 % of the machine each, with writers committing 10-row statements.
-- relay.sequence_batch_rows() does what relay.sequence_batch() does (same advisory lock, same offsets,
-- epochs and `seq`) and, when asked (`want_rows`), also returns the rows it moved, in the columns the
-- history read returns (the data and info as text, the lag since they were written), as arrays; the
-- caller's reader hands them to its hub when they follow its cursor, and reads the history otherwise
-- (another node's batch came in between). Building the arrays lengthens the call, so the caller asks
-- for them only while it keeps up: after a full batch (a backlog) it reads the history beside the next
-- call instead, as before, which keeps the two overlapping when the sequencer is the bottleneck. Its NOTIFY on relay_publications carries the caller's `tag`, so that the caller's own
-- listener can tell its own batch (already handed over) from another node's. Nodes of the previous
-- release keep calling relay.sequence_batch(), redefined at the end as this function without the rows
-- (same results, untagged NOTIFY); every node wakes on the other nodes' notifications.

CREATE FUNCTION relay.sequence_batch_rows(
    batch_size integer, arm boolean, tag text, want_rows boolean,
    OUT moved integer, OUT busy boolean, OUT armed boolean, OUT last_seq bigint,
    OUT seqs bigint[], OUT channels text[], OUT offsets bigint[], OUT epochs text[],
    OUT datas text[], OUT infos text[], OUT lags float8[]
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
        RETURNING seq, channel, "offset", epoch, data, info, written_at
    ), deleted AS (
        DELETE FROM relay.changelog l
        WHERE (l.xid, l.id) > (from_xid, from_id)
          AND (l.xid, l.id) <= ((SELECT k.xid FROM last_key k), (SELECT k.id FROM last_key k))
    )
    -- The moved rows, as the history read returns them (one aggregate pass: the arrays' elements
    -- line up; the caller orders them by seq).
    SELECT count(*)::integer, array_agg(m.seq) FILTER (WHERE want_rows),
           array_agg(m.channel) FILTER (WHERE want_rows),
           array_agg(m."offset") FILTER (WHERE want_rows), array_agg(m.epoch) FILTER (WHERE want_rows),
           array_agg(m.data::text) FILTER (WHERE want_rows),
           array_agg(m.info::text) FILTER (WHERE want_rows),
           array_agg(extract(epoch FROM clock_timestamp() - m.written_at)::float8)
               FILTER (WHERE want_rows)
    INTO moved, seqs, channels, offsets, epochs, datas, infos, lags
    FROM moved_rows m;
    last_seq := last_seq + moved;
    -- Wake the other nodes' readers, unless the NOTIFY queue is half full (their poll timers cover a
    -- skipped wake-up). Writers no longer notify while changes flow, so this lock is uncontended.
    IF moved > 0 AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_publications', tag);
    END IF;
END
$$;

-- As relay.sequence_batch() (migration 0020): plans made once per connection, by the indexes, no JIT.
ALTER FUNCTION relay.sequence_batch_rows(integer, boolean, text, boolean)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET jit = off;

-- One definition of the sequencer: relay.sequence_batch(), which nodes of the previous release call
-- during a rolling deploy (and the tests call directly), is relay.sequence_batch_rows() without the
-- rows, its NOTIFY untagged as before.
CREATE OR REPLACE FUNCTION relay.sequence_batch(
    batch_size integer DEFAULT 1000, arm boolean DEFAULT false,
    OUT moved integer, OUT busy boolean, OUT armed boolean, OUT last_seq bigint
)
LANGUAGE sql VOLATILE AS $$
    SELECT r.moved, r.busy, r.armed, r.last_seq FROM relay.sequence_batch_rows(batch_size, arm, '', false) r
$$;
