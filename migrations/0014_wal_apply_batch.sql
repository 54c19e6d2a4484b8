-- The `wal` leader writes a batch in ONE statement: the row conversions (record literal → channel and
-- publication JSON, with the capture trigger's expressions) run inside the same statement as the
-- history write, and their JSON goes straight into relay.wal_apply_batch() instead of travelling
-- back to the connector as text and being parsed again by relay.wal_apply() (migration 0008). The
-- data is `json` (migration 0015: publications keep the text they were published with).
--
-- relay.wal_apply_batch() does what relay.wal_apply() does (which it leaves in place for a node of
-- the previous version during a rolling deploy): under the row lock of relay.wal_state, it drops
-- the publications of transactions at or below the stored position (a replay), gives the others
-- their offsets and `seq`, moves the position to `upto` in the same transaction, and wakes the
-- readers. Publications are taken in the order of `keys` (the leader's order: commit order, then a
-- transaction's changes in order, then its mappings by trigger name), so the arrays may come in any
-- order (they are built by array_agg, whose input order is not guaranteed).

CREATE FUNCTION relay.wal_apply_batch(
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
    ), tops AS (
        INSERT INTO relay.channels AS ch (name, epoch, top_offset, updated_at)
        SELECT channel, relay.new_epoch(), n, now() FROM counts
        ON CONFLICT (name) DO UPDATE
            SET top_offset = ch.top_offset + EXCLUDED.top_offset, updated_at = now()
        RETURNING name, epoch, top_offset
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
