-- The `wal` capture mode (logical replication with pgoutput): the settings row that tells SQL which
-- mode runs, the leader's stored position, relay.publish() through pg_logical_emit_message(), and the
-- function that writes one batch of decoded transactions into the history.
--
-- In `wal` mode no capture trigger exists: the leader node reads the publication of the mapped tables
-- from a persistent slot, turns each committed row change into the same publication JSON the trigger
-- would have written, and calls relay.wal_apply() once per batch of transactions. relay.wal_apply()
-- assigns offsets and `seq` exactly as relay.sequence_changes() does (same relay.channels,
-- relay.sequencer and relay.publications), and stores the end LSN of the last transaction it applied
-- in the same transaction; only then does the leader confirm the slot. A leader that restarts (or a
-- new one) streams from the stored LSN and relay.wal_apply() drops every publication of a transaction
-- at or below it, so a replay writes nothing twice and offsets come out identical.

-- Connector settings that SQL needs to know; `capture.mode` is 'trigger' (default) or 'wal'. (The
-- function is not named relay.capture_*: that prefix belongs to the generated trigger functions, and
-- a trigger sync drops the ones it does not know.)
CREATE TABLE relay.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE FUNCTION relay.current_capture_mode() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT value FROM relay.settings WHERE key = 'capture.mode'), 'trigger')
$$;

-- The `wal` leader's position: every publication of every transaction whose commit ends at or below
-- `lsn` is in relay.publications. `slot_name` is the slot that position belongs to; `slot_losses`
-- counts the times the slot was found lost and the channels got new epochs.
CREATE TABLE relay.wal_state (
    id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
    slot_name   text,
    lsn         pg_lsn,
    slot_losses bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO relay.wal_state DEFAULT VALUES;

-- relay.publish() keeps its trigger-mode body (whatever earlier migrations made it) under another
-- name, and dispatches on the mode: in `wal` mode it writes no table row, only a transactional
-- logical-decoding message that the leader reads from the slot in commit order.
ALTER FUNCTION relay.publish(text, jsonb, jsonb) RENAME TO publish_changelog;

CREATE FUNCTION relay.publish(channel text, data jsonb, info jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'relay.publish: channel must not be empty';
    END IF;
    IF relay.current_capture_mode() = 'wal' THEN
        PERFORM pg_logical_emit_message(
            true, 'relay',
            jsonb_build_object('channel', channel, 'data', data, 'info', info)::text);
    ELSE
        PERFORM relay.publish_changelog(channel, data, info);
    END IF;
END
$$;

-- Writes one batch of decoded transactions into the history, in array order (commit order). Element
-- i is a publication of the transaction ending at lsns[i]; publications of transactions at or below
-- the stored position are dropped (a replay after a restart or a leader change). `upto` is the end
-- LSN of the batch's last transaction (with no publication at all, e.g. a heartbeat, only the position
-- moves). Returns how many publications were written.
CREATE FUNCTION relay.wal_apply(
    slot text, lsns text[], channels text[], datas text[], infos text[], written_micros bigint[],
    upto pg_lsn
) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored pg_lsn;
    stored_slot text;
    moved integer;
BEGIN
    SELECT s.lsn, s.slot_name INTO stored, stored_slot FROM relay.wal_state s FOR UPDATE;
    IF stored_slot IS DISTINCT FROM slot THEN
        RAISE EXCEPTION 'relay.wal_apply: the stored position belongs to slot %, not %', stored_slot, slot;
    END IF;

    WITH batch AS MATERIALIZED (
        SELECT u.channel, u.data::jsonb AS data, u.info::jsonb AS info,
               timestamptz '2000-01-01 00:00:00+00' + u.micros * interval '1 microsecond' AS written_at,
               row_number() OVER (ORDER BY u.ord) AS grn,
               row_number() OVER (PARTITION BY u.channel ORDER BY u.ord) AS rn
        FROM unnest(lsns, channels, datas, infos, written_micros)
             WITH ORDINALITY AS u(lsn, channel, data, info, micros, ord)
        WHERE stored IS NULL OR u.lsn::pg_lsn > stored
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

-- After the slot was lost (dropped, or invalidated by max_slot_wal_keep_size): every channel gets a
-- new epoch, so a client positioned in the old stream gets `recovered: false` instead of a silent
-- gap, and the position restarts at `lsn` (the new slot's consistent point) under `slot`.
CREATE FUNCTION relay.wal_slot_lost(slot text, lsn pg_lsn) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE relay.channels SET epoch = relay.new_epoch(), updated_at = now();
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE relay.wal_state
    SET slot_name = slot, lsn = wal_slot_lost.lsn, slot_losses = slot_losses + 1, updated_at = now();
    RETURN n;
END
$$;
