-- A channel's top offset moves by an UPDATE; only a channel seen for the first time is INSERTed.
--
-- relay.sequence_batch() (trigger mode) and relay.wal_apply_batch() (wal mode) used one
-- INSERT ... ON CONFLICT DO UPDATE for every channel of a batch. A BEFORE INSERT trigger fires for
-- every row an INSERT proposes, conflicting or not, so each channel of each batch ran
-- relay.channels_first_epoch() (migration 0009: a PL/pgSQL call and a query of relay.sequencer) and
-- a speculative insertion before its update: about 12-15 µs of the database's time per channel per
-- batch (docs/benchmarks.md). Now the batch's channels that exist are updated first, and only the
-- others go through the INSERT, which keeps its ON CONFLICT DO UPDATE for a channel that another
-- transaction creates meanwhile (nothing in the relay does today, since batches are written one at a
-- time; it is the safety net the single INSERT was). Offsets, epochs and `seq` come out exactly as
-- before; the functions keep their signatures, so nodes of the previous version call them unchanged
-- during a rolling deploy.

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
    IF NOT EXISTS (
        SELECT 1 FROM relay.changelog c
        WHERE (c.xid, c.id) > (from_xid, from_id) AND c.xid < horizon
    ) THEN
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
        DELETE FROM relay.changelog l USING batch b WHERE l.xid = b.xid AND l.id = b.id
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

CREATE OR REPLACE FUNCTION relay.wal_apply_batch(
    slot text, upto pg_lsn, keys bigint[], lsns pg_lsn[], channels text[], datas json[],
    infos jsonb[], written_micros bigint[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored pg_lsn;
    stored_slot text;
    moved integer;
BEGIN
    SELECT s.lsn, s.slot_name INTO stored, stored_slot FROM relay.wal_state s FOR UPDATE;
    IF stored_slot IS DISTINCT FROM slot THEN
        RAISE EXCEPTION 'relay.wal_apply_batch: the stored position belongs to slot %, not %',
            stored_slot, slot;
    END IF;

    WITH batch AS MATERIALIZED (
        SELECT u.channel, u.data, u.info,
               timestamptz '2000-01-01 00:00:00+00' + u.micros * interval '1 microsecond' AS written_at,
               row_number() OVER (ORDER BY u.key) AS grn,
               row_number() OVER (PARTITION BY u.channel ORDER BY u.key) AS rn
        FROM unnest(keys, lsns, channels, datas, infos, written_micros)
             AS u(key, lsn, channel, data, info, micros)
        WHERE stored IS NULL OR u.lsn > stored
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
    ), base AS (
        UPDATE relay.sequencer SET last_seq = last_seq + (SELECT count(*) FROM batch)
        WHERE EXISTS (SELECT 1 FROM batch)
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
    )
    SELECT count(*) INTO moved FROM moved_rows;

    IF stored IS NULL OR upto > stored THEN
        UPDATE relay.wal_state SET lsn = upto, updated_at = now();
    END IF;
    -- Wake every node's stream reader, unless the NOTIFY queue is half full (their poll timers cover
    -- a skipped wake-up; a full queue would make this commit fail).
    IF moved > 0 AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_publications', '');
    END IF;
    RETURN moved;
END
$$;
