-- The relay's own schema: the changelog that triggers write into, the sequencer that gives every change
-- its place in its channel's stream, and the history (publications) that every connector node reads.
--
-- Flow: a writer's transaction inserts into relay.changelog (via a generated trigger, relay.publish()
-- or a client publication) and sends an empty NOTIFY on 'relay_changes'. A connector calls
-- relay.sequence_changes(), which moves the changes below the xid8 horizon into relay.publications,
-- assigning per-channel offsets and a global commit-ordered sequence number, and NOTIFYs
-- 'relay_publications'. Every connector node reads relay.publications by seq and fans out.

CREATE SCHEMA IF NOT EXISTS relay;

-- Changes recorded in the writer's transaction, waiting to be sequenced. A queue: rows are deleted when
-- they are moved into relay.publications.
CREATE TABLE relay.changelog (
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    channel    text        NOT NULL,
    data       jsonb       NOT NULL,
    info       jsonb,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (xid, id)
);

-- One row per channel that ever had a publication: its epoch and the offset of its newest publication.
CREATE TABLE relay.channels (
    name       text        PRIMARY KEY,
    epoch      text        NOT NULL,
    top_offset bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The history: every sequenced publication. `seq` is global and strictly increases in commit order
-- (it is assigned only while holding the sequencer's transaction lock), so a reader's `seq > cursor`
-- never skips a row. `offset` is contiguous per channel.
CREATE TABLE relay.publications (
    seq          bigint      PRIMARY KEY,
    channel      text        NOT NULL,
    "offset"     bigint      NOT NULL,
    epoch        text        NOT NULL,
    data         jsonb       NOT NULL,
    info         jsonb,
    written_at   timestamptz NOT NULL,
    sequenced_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX publications_channel_offset ON relay.publications (channel, "offset");

-- The sequencer's single row: the last global sequence number handed out.
CREATE TABLE relay.sequencer (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_seq bigint  NOT NULL DEFAULT 0
);
INSERT INTO relay.sequencer DEFAULT VALUES;

-- A fresh random epoch: 16 hex characters.
CREATE FUNCTION relay.new_epoch() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT substr(replace(gen_random_uuid()::text, '-', ''), 1, 16)
$$;

-- Wake the connectors, unless the NOTIFY queue is more than half full: a full queue makes the
-- notifying transaction fail at commit, and the relay must never make an application's write fail.
-- The connectors poll on a timer, so a skipped wake-up only delays delivery.
CREATE FUNCTION relay.wake() RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_changes', '');
    END IF;
END
$$;

-- Publish `data` to `channel` from SQL: delivered if and only if the calling transaction commits, in
-- order with the transaction's other changes.
CREATE FUNCTION relay.publish(channel text, data jsonb, info jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'relay.publish: channel must not be empty';
    END IF;
    INSERT INTO relay.changelog (channel, data, info) VALUES (channel, data, info);
    PERFORM relay.wake();
END
$$;

-- Move up to `batch_size` changes from the changelog into the history. Returns how many were moved.
--
-- Gapless: only changes of transactions below the xid8 horizon (the oldest transaction still running)
-- are taken, so no change can later appear before one already taken; order is (xid, id), the same for
-- every caller. Serialized: the transaction-level advisory lock makes concurrent callers (several
-- connector nodes) take turns, so `seq` order equals commit order.
CREATE FUNCTION relay.sequence_changes(batch_size integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon xid8;
    moved integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('relay.sequence_changes'));
    horizon := pg_snapshot_xmin(pg_current_snapshot());

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

    IF moved > 0 THEN
        PERFORM pg_notify('relay_publications', '');
    END IF;
    RETURN moved;
END
$$;
