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
