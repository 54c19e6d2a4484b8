-- Presence shared by every connector node, and user notifications from SQL.
--
-- A member of a channel's presence is a subscription: (channel, client) with the user and the
-- connection / channel info. Each node registers in relay.nodes and heartbeats; members belong to the
-- node that serves their connection. A member is visible while its node's heartbeat is fresh: a node
-- that dies (SIGKILL, lost host) stops heartbeating and its members vanish from presence after the
-- node's TTL; the next heartbeat of any node deletes them and announces their leave.
--
-- Join and leave events go to every node with pg_notify('relay_presence', …) in the transaction that
-- changes the table: they are ephemeral pushes (as in Centrifugo), not part of any channel's history;
-- presence itself (the table) is the authoritative state. The same notification channel carries
-- server-API `disconnect` orders to every node.

CREATE TABLE relay.nodes (
    id           text        PRIMARY KEY,
    name         text        NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    stats        jsonb       NOT NULL DEFAULT '{}'
);

CREATE TABLE relay.presence (
    channel    text        NOT NULL,
    client     text        NOT NULL,
    "user"     text        NOT NULL,
    conn_info  jsonb,
    chan_info  jsonb,
    node       text        NOT NULL,
    -- Set anew by every join: a late leave of an earlier membership never removes a newer one.
    member     text        NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, client)
);
CREATE INDEX presence_client ON relay.presence (client);
CREATE INDEX presence_node ON relay.presence (node);

-- One join or leave event to every node. Infos that would make the payload too large for NOTIFY
-- (8000 bytes) are left out of the event (presence queries still return them). Skipped, like the
-- relay's wake-ups, when the NOTIFY queue is more than half full.
CREATE FUNCTION relay.presence_event(p_kind text, p_channel text, p_client text, p_user text,
                                     p_conn_info jsonb, p_chan_info jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    info jsonb := jsonb_build_object('user', p_user, 'client', p_client);
    payload text;
BEGIN
    IF p_conn_info IS NOT NULL THEN info := info || jsonb_build_object('conn_info', p_conn_info); END IF;
    IF p_chan_info IS NOT NULL THEN info := info || jsonb_build_object('chan_info', p_chan_info); END IF;
    payload := jsonb_build_object('k', p_kind, 'c', p_channel, 'i', info)::text;
    IF octet_length(payload) > 7900 THEN
        payload := jsonb_build_object('k', p_kind, 'c', p_channel,
                                      'i', jsonb_build_object('user', p_user, 'client', p_client))::text;
    END IF;
    IF octet_length(payload) <= 7900 AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('relay_presence', payload);
    END IF;
END
$$;

-- Adds a member (or renews it). With p_max_members > 0, refuses (returns false) when the channel has
-- that many live members already; concurrent joins of one channel take turns for the check.
CREATE FUNCTION relay.presence_join(p_channel text, p_client text, p_user text, p_conn_info jsonb,
                                    p_chan_info jsonb, p_node text, p_member text,
                                    p_max_members integer, p_announce boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    IF p_max_members > 0 THEN
        PERFORM pg_advisory_xact_lock(hashtext('relay.presence:' || p_channel));
        SELECT count(*) INTO n
        FROM relay.presence p JOIN relay.nodes d ON d.id = p.node
        WHERE p.channel = p_channel AND p.client <> p_client AND d.expires_at > now();
        IF n >= p_max_members THEN
            RETURN false;
        END IF;
    END IF;
    INSERT INTO relay.presence AS p (channel, client, "user", conn_info, chan_info, node, member)
    VALUES (p_channel, p_client, p_user, p_conn_info, p_chan_info, p_node, p_member)
    ON CONFLICT (channel, client) DO UPDATE
        SET "user" = EXCLUDED."user", conn_info = EXCLUDED.conn_info, chan_info = EXCLUDED.chan_info,
            node = EXCLUDED.node, member = EXCLUDED.member, joined_at = now();
    IF p_announce THEN
        PERFORM relay.presence_event('join', p_channel, p_client, p_user, p_conn_info, p_chan_info);
    END IF;
    RETURN true;
END
$$;

-- Removes the memberships of a client: one (p_channel, p_member), or all of them (p_channel NULL: the
-- connection closed). Announces each leave.
CREATE FUNCTION relay.presence_leave(p_client text, p_channel text DEFAULT NULL,
                                     p_member text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        DELETE FROM relay.presence p
        WHERE p.client = p_client
          AND (p_channel IS NULL OR (p.channel = p_channel AND p.member = p_member))
        RETURNING p.channel, p.client, p."user", p.conn_info, p.chan_info
    LOOP
        PERFORM relay.presence_event('leave', r.channel, r.client, r."user", r.conn_info, r.chan_info);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Removes nodes whose heartbeat expired and every member of a node that is gone, announcing the leaves.
-- Any node may call it (each heartbeat does); concurrent callers delete disjoint rows.
CREATE FUNCTION relay.presence_expire() RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    DELETE FROM relay.nodes WHERE expires_at < now();
    FOR r IN
        DELETE FROM relay.presence p
        WHERE NOT EXISTS (SELECT 1 FROM relay.nodes d WHERE d.id = p.node)
        RETURNING p.channel, p.client, p."user", p.conn_info, p.chan_info
    LOOP
        PERFORM relay.presence_event('leave', r.channel, r.client, r."user", r.conn_info, r.chan_info);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- User notifications from SQL: publishes `data` on the personal channel `<prefix>#<user>` of each user
-- (every connection of the user subscribed to it gets it; the `#` boundary lets only that user
-- subscribe). Delivered if and only if the calling transaction commits, in order with its other changes.
CREATE FUNCTION relay.notify_users(users text[], data jsonb, prefix text DEFAULT 'notifications')
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    u text;
    n integer := 0;
BEGIN
    FOREACH u IN ARRAY coalesce(users, ARRAY[]::text[]) LOOP
        IF u IS NULL OR u = '' THEN
            RAISE EXCEPTION 'relay.notify_users: user ids must not be empty';
        END IF;
        PERFORM relay.publish(prefix || '#' || u, data);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
