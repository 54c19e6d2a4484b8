//! Rooms, direct messages and read receipts against a real PostgreSQL (a fresh database per test, with
//! the repository's migrations): identity from the envelope only, idempotency, who may edit and read.

mod support;

use serde_json::{Value, json};
use sqlx::PgPool;
use support::*;
use writer_lambda::{State, Status, handle};

/// A message from a signed-in user.
fn from_user(id: &str, user: &str, name: &str, data: Value) -> Value {
    json!({
        "id": id, "clientId": user, "clientKind": "user", "connectionId": format!("conn-{user}"),
        "timestamp": TIMESTAMP, "name": name, "data": data.to_string(), "encoding": "json"
    })
}

async fn one(state: &State, message: Value) -> (Status, Option<String>) {
    let r = handle(state, envelope(vec![message]))
        .await
        .expect("handled");
    (r.results[0].status, r.results[0].reason.clone())
}

async fn scalar(pool: &PgPool, sql: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>(sql)
        .fetch_optional(pool)
        .await
        .expect("query")
        .flatten()
}

#[sqlx::test(migrations = "../migrations")]
async fn room_messages_are_the_users_and_only_they_edit_them(pool: PgPool) {
    let state = State::new(pool.clone());
    let msg = json!({"roomId": "general", "content": "hi all"});
    assert_eq!(
        one(&state, from_user("m1", "alice", "roomMsg", msg.clone()))
            .await
            .0,
        Status::Inserted
    );
    // A retry of the same event changes nothing.
    assert_eq!(
        one(&state, from_user("m1", "alice", "roomMsg", msg))
            .await
            .0,
        Status::Duplicate
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT author || '|' || room_id || '|' || body FROM chat_messages"
        )
        .await,
        Some("alice|general|hi all".into())
    );
    // Bob cannot edit it; alice can.
    let (status, reason) = one(
        &state,
        from_user(
            "e1",
            "bob",
            "editMsg",
            json!({"msgId": "m1", "content": "bob was here"}),
        ),
    )
    .await;
    assert_eq!(status, Status::Rejected);
    assert!(reason.unwrap().contains("only its author can edit it"));
    assert_eq!(
        one(
            &state,
            from_user(
                "e2",
                "alice",
                "editMsg",
                json!({"msgId": "m1", "content": "hi everyone"})
            )
        )
        .await
        .0,
        Status::Updated
    );
    assert_eq!(
        scalar(&pool, "SELECT body || '|' || is_edited FROM chat_messages").await,
        Some("hi everyone|true".into())
    );
    // A message to a room that does not exist is refused.
    let (status, reason) = one(
        &state,
        from_user(
            "m2",
            "alice",
            "roomMsg",
            json!({"roomId": "nowhere", "content": "x"}),
        ),
    )
    .await;
    assert_eq!(status, Status::Rejected);
    assert!(reason.unwrap().contains("no room"));
}

#[sqlx::test(migrations = "../migrations")]
async fn anonymous_and_server_senders_are_refused(pool: PgPool) {
    let state = State::new(pool.clone());
    for kind in ["anonymous", "server"] {
        let mut m = from_user(
            &format!("m-{kind}"),
            "alice",
            "roomMsg",
            json!({"roomId": "general", "content": "as alice?"}),
        );
        m["clientKind"] = kind.into();
        let (status, reason) = one(&state, m).await;
        assert_eq!(status, Status::Rejected, "{kind}");
        assert!(reason.unwrap().contains("sign in"), "{kind}");
    }
    assert_eq!(count(&pool, "chat_messages").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn rooms_are_created_once(pool: PgPool) {
    let state = State::new(pool.clone());
    let data = json!({"roomId": "rust-fans", "title": "Rust fans"});
    assert_eq!(
        one(&state, from_user("r1", "alice", "createRoom", data.clone()))
            .await
            .0,
        Status::Inserted
    );
    assert_eq!(
        one(&state, from_user("r2", "bob", "createRoom", data))
            .await
            .0,
        Status::Duplicate
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT created_by FROM chat_rooms WHERE room_id = 'rust-fans'"
        )
        .await,
        Some("alice".into())
    );
    for bad in ["Rust", "a:b", "", "-x"] {
        let (status, _) = one(
            &state,
            from_user(
                &format!("bad-{bad}"),
                "alice",
                "createRoom",
                json!({"roomId": bad, "title": "t"}),
            ),
        )
        .await;
        assert_eq!(status, Status::Invalid, "{bad:?}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn direct_messages_conversations_and_receipts(pool: PgPool) {
    let state = State::new(pool.clone());
    let dm = |id: &str, from: &str, to: &str, text: &str| {
        from_user(id, from, "directMsg", json!({"to": to, "content": text}))
    };
    assert_eq!(
        one(&state, dm("d1", "bob", "alice", "hi alice")).await.0,
        Status::Inserted
    );
    assert_eq!(
        one(&state, dm("d2", "alice", "bob", "hi bob")).await.0,
        Status::Inserted
    );
    // One conversation, in channel order, started by bob.
    assert_eq!(
        scalar(
            &pool,
            "SELECT user_a || ',' || user_b || '|' || started_by FROM chat_conversations"
        )
        .await,
        Some("alice,bob|bob".into())
    );
    // Both users were told once, on their personal channels, in the writer's transaction.
    assert_eq!(
        scalar(
            &pool,
            "SELECT string_agg(channel || '=' || (data->>'channel') || '/' || (data->>'started_by'), ' ' \
             ORDER BY channel) FROM relay.changelog WHERE channel LIKE 'notifications#%'"
        )
        .await,
        Some("notifications#alice=dm#alice,bob/bob notifications#bob=dm#alice,bob/bob".into())
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT sender || '>' || recipient FROM chat_direct_messages WHERE msg_id = 'd1'"
        )
        .await,
        Some("bob>alice".into())
    );
    // The sender cannot mark its own message read; a third user cannot either; the recipient can.
    let read =
        |id: &str, who: &str, msg: &str| from_user(id, who, "readMsg", json!({"msgId": msg}));
    assert_eq!(
        one(&state, read("x1", "bob", "d1")).await.0,
        Status::Rejected
    );
    assert_eq!(
        one(&state, read("x2", "carol", "d1")).await.0,
        Status::Rejected
    );
    assert_eq!(
        one(&state, read("x3", "alice", "d1")).await.0,
        Status::Updated
    );
    assert_eq!(
        scalar(&pool, "SELECT reader || '|' || msg_id FROM chat_receipts").await,
        Some("alice|d1".into())
    );
    // Receipts only move forward.
    assert_eq!(
        one(&state, dm("d3", "bob", "alice", "more")).await.0,
        Status::Inserted
    );
    assert_eq!(
        one(&state, read("x4", "alice", "d3")).await.0,
        Status::Updated
    );
    assert_eq!(
        one(&state, read("x5", "alice", "d1")).await.0,
        Status::Duplicate
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT msg_id FROM chat_receipts WHERE reader = 'alice'"
        )
        .await,
        Some("d3".into())
    );
    // A third user cannot edit a direct message (nor learn it exists); the sender can.
    let (status, reason) = one(
        &state,
        from_user(
            "e1",
            "carol",
            "editMsg",
            json!({"msgId": "d1", "content": "x"}),
        ),
    )
    .await;
    assert_eq!(status, Status::Rejected);
    assert!(reason.unwrap().contains("no message"));
    let (status, _) = one(
        &state,
        from_user(
            "e2",
            "alice",
            "editMsg",
            json!({"msgId": "d1", "content": "x"}),
        ),
    )
    .await;
    assert_eq!(
        status,
        Status::Rejected,
        "alice is the recipient, not the author"
    );
    assert_eq!(
        one(
            &state,
            from_user(
                "e3",
                "bob",
                "editMsg",
                json!({"msgId": "d1", "content": "hi alice!"})
            )
        )
        .await
        .0,
        Status::Updated
    );
    // Parties whose ids would change the channel's user list, and messages to oneself, are refused.
    assert_eq!(
        one(&state, dm("d4", "bob", "alice,carol", "x")).await.0,
        Status::Invalid
    );
    assert_eq!(
        one(&state, dm("d5", "bob", "x#y", "x")).await.0,
        Status::Invalid
    );
    assert_eq!(
        one(&state, dm("d6", "bob", "bob", "x")).await.0,
        Status::Rejected
    );
    assert_eq!(
        one(&state, dm("d7", "a,b", "bob", "x")).await.0,
        Status::Rejected
    );
    assert_eq!(count(&pool, "chat_direct_messages").await, 3);
}
