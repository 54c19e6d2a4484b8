-- A channel's row in relay.channels is created only when something is published on it (by the
-- sequencer), never by a subscriber: a client subscribing to any number of channels on an open pattern
-- writes nothing.
--
-- A subscriber to a channel that has no row yet must still learn the epoch the channel's first
-- publication will carry (so its position can be recovered exactly). That epoch is therefore a
-- function of the channel name and a random salt drawn once per database: relay.first_epoch(name). A
-- BEFORE INSERT trigger gives every new row that epoch, whoever inserts it. Later epochs (a reset, a
-- changed retention rule) stay random, and rows are never deleted, so a channel's first epoch is used
-- once; a recreated database draws a new salt, so positions from an old database never match.

ALTER TABLE relay.sequencer ADD COLUMN epoch_salt text NOT NULL DEFAULT relay.new_epoch();

CREATE FUNCTION relay.first_epoch(channel_name text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT substr(md5(s.epoch_salt || ':' || channel_name), 1, 16) FROM relay.sequencer s
$$;

CREATE FUNCTION relay.channels_first_epoch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.epoch := relay.first_epoch(NEW.name);
    RETURN NEW;
END
$$;

CREATE TRIGGER channels_first_epoch BEFORE INSERT ON relay.channels
FOR EACH ROW EXECUTE FUNCTION relay.channels_first_epoch();

-- A channel's publications from an offset, in either direction, up to max_rows and until their text
-- passes max_bytes: the row that crosses it is the last one returned (so the caller can tell), and the
-- scan stops there, however many rows max_rows allows. STABLE: it reads in the calling statement's
-- snapshot, so the position read beside it matches.
CREATE FUNCTION relay.read_publications(
    channel_name text, from_offset bigint, forward boolean, max_rows bigint, max_bytes bigint
) RETURNS TABLE ("offset" bigint, data text, info text)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    r record;
    total bigint := 0;
BEGIN
    IF max_rows <= 0 THEN
        RETURN;
    END IF;
    IF forward THEN
        FOR r IN
            SELECT p."offset" AS o, p.data::text AS d, p.info::text AS i FROM relay.publications p
            WHERE p.channel = channel_name AND p."offset" > from_offset
            ORDER BY p."offset" LIMIT max_rows
        LOOP
            "offset" := r.o; data := r.d; info := r.i;
            RETURN NEXT;
            total := total + octet_length(r.d) + coalesce(octet_length(r.i), 0);
            EXIT WHEN total > max_bytes;
        END LOOP;
    ELSE
        FOR r IN
            SELECT p."offset" AS o, p.data::text AS d, p.info::text AS i FROM relay.publications p
            WHERE p.channel = channel_name AND p."offset" < from_offset
            ORDER BY p."offset" DESC LIMIT max_rows
        LOOP
            "offset" := r.o; data := r.d; info := r.i;
            RETURN NEXT;
            total := total + octet_length(r.d) + coalesce(octet_length(r.i), 0);
            EXIT WHEN total > max_bytes;
        END LOOP;
    END IF;
END
$$;
