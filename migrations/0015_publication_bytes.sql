-- Publication data keeps the text it was published with. Centrifugo forwards a publication's data
-- byte for byte, and the SDKs (Protobuf ones in particular) compare the bytes they get with the bytes
-- they sent; `jsonb` rewrote them (spacing, key order, duplicate keys). The history and the changelog
-- now store `json` (validated text, kept as given). Rows captured from tables are still built with the
-- jsonb functions (their text is PostgreSQL's, as before); what is published with relay.publish() or
-- relay.publish_json() comes back exactly as written, except that a value spread over several lines
-- is put on one (JSON-protocol frames are newline-delimited): its text is then jsonb's.
--
-- Upgrading rewrites relay.publications (ALTER COLUMN TYPE holds an exclusive lock for the rewrite):
-- on a large history, run it when writes can wait that long.
ALTER TABLE relay.changelog ALTER COLUMN data TYPE json USING data::json;
ALTER TABLE relay.publications ALTER COLUMN data TYPE json USING data::json;

-- Publishes `data` on `channel` as written (see above). In `wal` mode a transactional logical
-- message (the leader reads it from the slot in commit order), in `trigger` mode a changelog row.
CREATE FUNCTION relay.publish_json(channel text, data json, info jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    text_of text := data::text;
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'relay.publish: channel must not be empty';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'relay.publish: data must not be NULL';
    END IF;
    IF strpos(text_of, E'\n') > 0 OR strpos(text_of, E'\r') > 0 THEN
        data := data::jsonb::json;
    END IF;
    IF relay.current_capture_mode() = 'wal' THEN
        PERFORM pg_logical_emit_message(
            true, 'relay', json_build_object('channel', channel, 'data', data, 'info', info)::text);
    ELSE
        INSERT INTO relay.changelog (channel, data, info) VALUES (channel, data, info);
        PERFORM relay.wake();
    END IF;
END
$$;

-- relay.publish() keeps its signature (SQL callers pass jsonb, or literals that resolve to it) and
-- goes through relay.publish_json(); its data's text is jsonb's, as before.
CREATE OR REPLACE FUNCTION relay.publish(channel text, data jsonb, info jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM relay.publish_json(channel, data::json, info);
END
$$;

DROP FUNCTION relay.publish_changelog(text, jsonb, jsonb);

-- The `wal` leader's batch write (migration 0008) keeps the text of each publication's data (json).
CREATE OR REPLACE FUNCTION relay.wal_apply(
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
        SELECT u.channel, u.data::json AS data, u.info::jsonb AS info,
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

-- The `wal` leader's one-statement batch write (migration 0014) takes the publications' data as json
-- (kept as written): the same function with a json[] argument.
DROP FUNCTION relay.wal_apply_batch(text, pg_lsn, bigint[], pg_lsn[], text[], jsonb[], jsonb[], bigint[]);

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
