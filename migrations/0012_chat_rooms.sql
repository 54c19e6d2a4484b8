-- The chat's rooms, direct messages and read receipts (issue 13). Every table here is written only by
-- the writer (writer-lambda), and every change reaches the clients through the relay like any row:
--
--   table                   channel (config.json mappings)     who may subscribe (config.json channels)
--   chat_rooms              rooms                              signed-in users
--   chat_messages           room:{room_id}                     signed-in users
--   chat_direct_messages    dm#{user_a},{user_b}               only user_a and user_b (user-limited)
--   chat_receipts           dm#{user_a},{user_b}               only user_a and user_b (user-limited)
--
-- The first message of a pair inserts its chat_conversations row and, in the same transaction, tells
-- both users on their personal channels (`SELECT relay.notify_users(ARRAY[user_a, user_b], ...)`, on
-- `notifications#{user}`, user-limited) that the conversation exists.
-- Authors are users (a token's `sub`): the writer refuses room and direct messages from anonymous
-- connections, and takes the author from the envelope's identity, never from the message body. The
-- seed's `chat_data` (channel `incoming-chat`) is unchanged.

CREATE TABLE IF NOT EXISTS public.chat_rooms (
    room_id    text        PRIMARY KEY
        CONSTRAINT chat_rooms_room_id_check CHECK (room_id ~ '^[a-z0-9][a-z0-9_-]{0,39}$'),
    title      text        NOT NULL CONSTRAINT chat_rooms_title_check CHECK (length(title) BETWEEN 1 AND 80),
    created_by text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The room every page shows; created here, so it is not in the `rooms` channel's history (the page
-- lists it always).
INSERT INTO public.chat_rooms (room_id, title, created_by) VALUES ('general', 'General', 'relay')
ON CONFLICT (room_id) DO NOTHING;

CREATE TABLE IF NOT EXISTS public.chat_messages (
    msg_id        text        PRIMARY KEY,
    room_id       text        NOT NULL REFERENCES public.chat_rooms (room_id),
    author        text        NOT NULL,
    body          text        NOT NULL,
    is_edited     boolean     NOT NULL DEFAULT false,
    seq           bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at_ms bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS chat_messages_room_seq ON public.chat_messages (room_id, seq);

-- A conversation between two users: user_a < user_b, so each pair has one channel.
CREATE TABLE IF NOT EXISTS public.chat_conversations (
    user_a     text        NOT NULL,
    user_b     text        NOT NULL,
    started_by text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_a, user_b),
    CONSTRAINT chat_conversations_order_check CHECK (user_a < user_b)
);

CREATE TABLE IF NOT EXISTS public.chat_direct_messages (
    msg_id        text        PRIMARY KEY,
    user_a        text        NOT NULL,
    user_b        text        NOT NULL,
    sender        text        NOT NULL,
    recipient     text        NOT NULL,
    body          text        NOT NULL,
    is_edited     boolean     NOT NULL DEFAULT false,
    seq           bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at_ms bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (user_a, user_b) REFERENCES public.chat_conversations (user_a, user_b),
    CONSTRAINT chat_direct_messages_pair_check CHECK (
        user_a < user_b
        AND ((sender = user_a AND recipient = user_b) OR (sender = user_b AND recipient = user_a)))
);
CREATE INDEX IF NOT EXISTS chat_direct_messages_pair_seq ON public.chat_direct_messages (user_a, user_b, seq);

-- Read receipts: how far `reader` has read the conversation (the newest message it has seen). Only
-- moves forward.
CREATE TABLE IF NOT EXISTS public.chat_receipts (
    user_a   text        NOT NULL,
    user_b   text        NOT NULL,
    reader   text        NOT NULL,
    msg_id   text        NOT NULL REFERENCES public.chat_direct_messages (msg_id),
    read_seq bigint      NOT NULL,
    read_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_a, user_b, reader),
    CONSTRAINT chat_receipts_reader_check CHECK (reader = user_a OR reader = user_b)
);
