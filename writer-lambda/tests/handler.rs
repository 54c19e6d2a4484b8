//! The handler against a real PostgreSQL: a fresh database per test, with the repository's migrations.

mod support;

use serde_json::json;
use sqlx::PgPool;
use support::*;
use writer_lambda::{Error, State, Status, handle};

#[sqlx::test(migrations = "../migrations")]
async fn same_event_twice_gives_one_row(pool: PgPool) {
    let state = State::new(pool.clone());
    let event = envelope(vec![chat("m1", "c1", "hello")]);

    let first = handle(&state, event.clone()).await.expect("first");
    assert_eq!(statuses(&first), [Status::Inserted]);
    assert_eq!(first.results[0].id.as_deref(), Some("m1"));
    assert_eq!(first.results[0].name.as_deref(), Some("chatMsg"));
    assert_eq!(first.results[0].reason, None);

    let second = handle(&state, event).await.expect("second");
    assert_eq!(statuses(&second), [Status::Duplicate]);
    assert!(second.results[0].reason.is_some());

    assert_eq!(count(&pool, "chat_data").await, 1);
    assert_eq!(count(&pool, "chat_processed_messages").await, 1);
    assert_eq!(
        row(&pool, "m1").await,
        Some(Row {
            msg_id: "m1".into(),
            username: "user-c1".into(),
            msg_data: "hello".into(),
            client_id: "c1".into(),
            created_at_timestamp: TIMESTAMP,
            is_edited: false,
        })
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_duplicates_apply_once(pool: PgPool) {
    let state = State::new(pool.clone());
    let event = envelope(vec![chat("m1", "c1", "hello")]);
    let (a, b) = tokio::join!(handle(&state, event.clone()), handle(&state, event));
    let mut both = [
        a.expect("a").results[0].status,
        b.expect("b").results[0].status,
    ];
    both.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(both, [Status::Duplicate, Status::Inserted]);
    assert_eq!(count(&pool, "chat_data").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn every_message_of_an_event_is_processed(pool: PgPool) {
    let state = State::new(pool.clone());
    let event = envelope(vec![
        chat("m1", "c1", "one"),
        chat("m2", "c2", "two"),
        json!({"id": "t1", "clientId": "c1", "name": "typing", "data": {}}),
        json!({"id": "bad", "clientId": "c1", "timestamp": 1, "name": "chatMsg", "data": {"content": "x"}}),
        edit("e1", "c1", "m1", "one, edited"),
        json!("not a message"),
    ]);
    let result = handle(&state, event).await.expect("handled");
    assert_eq!(
        statuses(&result),
        [
            Status::Inserted,
            Status::Inserted,
            Status::Skipped,
            Status::Invalid,
            Status::Updated,
            Status::Invalid,
        ]
    );
    let indexes: Vec<usize> = result.results.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4, 5]);
    assert!(
        result.results[2]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("typing"))
    );
    assert!(
        result.results[3]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("missing field `username`")),
        "{:?}",
        result.results[3]
    );
    assert_eq!(result.results[3].id.as_deref(), Some("bad"));
    assert_eq!(result.results[5].id, None);

    assert_eq!(count(&pool, "chat_data").await, 2);
    assert_eq!(row(&pool, "m1").await.expect("m1").msg_data, "one, edited");
    assert_eq!(row(&pool, "m2").await.expect("m2").msg_data, "two");
    // Skipped and invalid messages are not recorded as processed: only m1, m2, e1.
    assert_eq!(count(&pool, "chat_processed_messages").await, 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn edit_by_the_author_updates_the_row(pool: PgPool) {
    let state = State::new(pool.clone());
    handle(&state, envelope(vec![chat("m1", "c1", "hello")]))
        .await
        .expect("insert");
    let before = updated_at(&pool, "m1").await;

    let result = handle(&state, envelope(vec![edit("e1", "c1", "m1", "hello!")]))
        .await
        .expect("edit");
    assert_eq!(statuses(&result), [Status::Updated]);
    let row = row(&pool, "m1").await.expect("row");
    assert_eq!(row.msg_data, "hello!");
    assert!(row.is_edited);
    assert_eq!(row.username, "user-c1", "the author's name is kept");
    assert_eq!(row.created_at_timestamp, TIMESTAMP);
    assert!(updated_at(&pool, "m1").await > before, "updated_at moves");
}

#[sqlx::test(migrations = "../migrations")]
async fn edit_by_another_client_changes_nothing(pool: PgPool) {
    let state = State::new(pool.clone());
    handle(&state, envelope(vec![chat("m1", "c1", "hello")]))
        .await
        .expect("insert");
    let before = row(&pool, "m1").await;
    let updated_before = updated_at(&pool, "m1").await;

    let result = handle(
        &state,
        envelope(vec![
            edit("e1", "intruder", "m1", "pwned"),
            edit("e2", "c1", "nope", "nothing to edit"),
        ]),
    )
    .await
    .expect("handled");
    assert_eq!(statuses(&result), [Status::Rejected, Status::Rejected]);
    assert!(
        result.results[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("another client")),
        "{:?}",
        result.results[0]
    );
    assert!(
        result.results[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no message")),
        "{:?}",
        result.results[1]
    );
    assert_eq!(row(&pool, "m1").await, before);
    assert_eq!(updated_at(&pool, "m1").await, updated_before);
    assert_eq!(count(&pool, "chat_data").await, 1);
}

/// `message` with `clientKind` set.
fn as_kind(mut message: serde_json::Value, kind: &str) -> serde_json::Value {
    message["clientKind"] = json!(kind);
    message
}

#[sqlx::test(migrations = "../migrations")]
async fn the_same_id_in_another_namespace_is_another_author(pool: PgPool) {
    let state = State::new(pool.clone());
    // An anonymous client's id is visible in every row it writes; a token's `sub` can be any string.
    let anon = "5f0c1c1e-8a53-4c1e-9d3e-0a5b7d8e9f10";
    handle(
        &state,
        envelope(vec![as_kind(chat("m1", anon, "mine"), "anonymous")]),
    )
    .await
    .expect("insert");
    let kind: String = sqlx::query_scalar("SELECT client_kind FROM chat_data WHERE msg_id = 'm1'")
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(kind, "anonymous");
    let before = row(&pool, "m1").await;

    // A user whose `sub` is that id, the server API using it, and an envelope without `clientKind`:
    // none of them is the author.
    let result = handle(
        &state,
        envelope(vec![
            as_kind(edit("e1", anon, "m1", "borrowed"), "user"),
            as_kind(edit("e2", anon, "m1", "borrowed"), "server"),
            edit("e3", anon, "m1", "borrowed"),
        ]),
    )
    .await
    .expect("handled");
    assert_eq!(
        statuses(&result),
        [Status::Rejected, Status::Rejected, Status::Rejected]
    );
    assert_eq!(row(&pool, "m1").await, before, "nothing changed");

    // The anonymous author itself still can.
    let result = handle(
        &state,
        envelope(vec![as_kind(edit("e4", anon, "m1", "edited"), "anonymous")]),
    )
    .await
    .expect("handled");
    assert_eq!(statuses(&result), [Status::Updated]);

    // And the other way round: a user's message is not an anonymous client's to edit.
    handle(
        &state,
        envelope(vec![as_kind(chat("m2", "alice", "by alice"), "user")]),
    )
    .await
    .expect("insert");
    let result = handle(
        &state,
        envelope(vec![
            as_kind(edit("e5", "alice", "m2", "borrowed"), "anonymous"),
            as_kind(edit("e6", "alice", "m2", "edited"), "user"),
        ]),
    )
    .await
    .expect("handled");
    assert_eq!(statuses(&result), [Status::Rejected, Status::Updated]);
    assert_eq!(row(&pool, "m2").await.expect("row").msg_data, "edited");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replayed_edit_does_not_revert_a_later_one(pool: PgPool) {
    let state = State::new(pool.clone());
    let first_edit = envelope(vec![edit("e1", "c1", "m1", "v1")]);
    handle(&state, envelope(vec![chat("m1", "c1", "v0")]))
        .await
        .expect("insert");
    handle(&state, first_edit.clone()).await.expect("e1");
    handle(&state, envelope(vec![edit("e2", "c1", "m1", "v2")]))
        .await
        .expect("e2");
    assert_eq!(row(&pool, "m1").await.expect("row").msg_data, "v2");

    let replay = handle(&state, first_edit).await.expect("replay");
    assert_eq!(statuses(&replay), [Status::Duplicate]);
    assert_eq!(row(&pool, "m1").await.expect("row").msg_data, "v2");
}

#[sqlx::test(migrations = "../migrations")]
async fn data_as_object_json_string_or_base64(pool: PgPool) {
    let state = State::new(pool.clone());
    let data = |content: &str| json!({"username": "ada", "content": content});
    let msg = |id: &str, data: serde_json::Value, encoding: Option<&str>| {
        json!({"id": id, "clientId": "c1", "timestamp": 5, "name": "chatMsg",
               "data": data, "encoding": encoding})
    };
    let event = envelope(vec![
        msg("object", data("as object"), None),
        msg("string", json!(data("as string").to_string()), None),
        msg("json", json!(data("as json").to_string()), Some("json")),
        msg(
            "b64",
            json!(base64_json(&data("as base64 ✓ 🎉"))),
            Some("json/utf-8/base64"),
        ),
        json!({"id": "e-b64", "clientId": "c1", "name": "editedMsg", "encoding": "json/utf-8/base64",
               "data": base64_json(&json!({"username": "ada", "content": "edited ✓", "msgIdToEdit": "object"}))}),
        msg("cipher", json!("AAAA"), Some("cipher+aes-128-cbc/base64")),
    ]);
    let result = handle(&state, event).await.expect("handled");
    assert_eq!(
        statuses(&result),
        [
            Status::Inserted,
            Status::Inserted,
            Status::Inserted,
            Status::Inserted,
            Status::Updated,
            Status::Invalid,
        ]
    );
    assert_eq!(
        row(&pool, "object").await.expect("row").msg_data,
        "edited ✓"
    );
    assert_eq!(
        row(&pool, "string").await.expect("row").msg_data,
        "as string"
    );
    assert_eq!(row(&pool, "json").await.expect("row").msg_data, "as json");
    assert_eq!(
        row(&pool, "b64").await.expect("row").msg_data,
        "as base64 ✓ 🎉"
    );
    assert_eq!(row(&pool, "cipher").await, None);
}

#[sqlx::test(migrations = "../migrations")]
async fn invalid_data_is_reported_and_not_retried(pool: PgPool) {
    let state = State::new(pool.clone());
    let msg = |id: &str, data: serde_json::Value| json!({"id": id, "clientId": "c1", "timestamp": 5, "name": "chatMsg", "data": data});
    let event = envelope(vec![
        msg("no-content", json!({"username": "ada"})),
        msg("wrong-type", json!({"username": "ada", "content": 42})),
        msg("not-json", json!("{oops")),
        msg(
            "too-long",
            json!({"username": "ada", "content": "x".repeat(64 * 1024 + 1)}),
        ),
        msg("nul", json!({"username": "ada", "content": "a\u{0}b"})),
    ]);
    let result = handle(&state, event.clone()).await.expect("handled");
    assert_eq!(statuses(&result), [Status::Invalid; 5]);
    for (r, want) in result.results.iter().zip([
        "missing field `content`",
        "invalid type",
        "not valid JSON",
        "at most 65536",
        "NUL",
    ]) {
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|reason| reason.contains(want)),
            "{r:?}"
        );
    }
    assert_eq!(count(&pool, "chat_data").await, 0);
    assert_eq!(count(&pool, "chat_processed_messages").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_malformed_envelope_is_an_error_that_retry_cannot_fix(pool: PgPool) {
    let state = State::new(pool.clone());
    for event in [
        json!([1, 2]),
        json!({"messages": "nope"}),
        json!({"channel": "x"}),
    ] {
        let err = handle(&state, event.clone()).await.expect_err("invalid");
        assert!(matches!(err, Error::InvalidEvent(_)), "{event}: {err:?}");
        assert_eq!(err.error_type(), "InvalidEvent");
        assert!(!err.retryable());
    }
    let too_many = envelope(vec![chat("m", "c", "x"); 1001]);
    let err = handle(&state, too_many).await.expect_err("too many");
    assert!(err.to_string().contains("at most 1000"), "{err}");
    assert_eq!(count(&pool, "chat_data").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_closed_pool_is_a_retryable_error(pool: PgPool) {
    let state = State::new(pool.clone());
    pool.close().await;
    let err = handle(&state, envelope(vec![chat("m1", "c1", "hi")]))
        .await
        .expect_err("pool is closed");
    assert!(matches!(err, Error::Database { .. }), "{err:?}");
    assert_eq!(err.error_type(), "DatabaseError");
    assert!(err.retryable());
    assert!(
        err.message_chain().contains("m1"),
        "{}",
        err.message_chain()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_database_error_stops_the_event_and_a_retry_completes_it(pool: PgPool) {
    let state = State::new(pool.clone());
    let event = envelope(vec![
        chat("m1", "c1", "v0"),
        edit("e1", "c1", "m1", "v1"),
        chat("m2", "c1", "after"),
    ]);
    break_writes(&pool, "UPDATE").await;
    let err = handle(&state, event.clone())
        .await
        .expect_err("update fails");
    assert!(err.retryable());
    assert!(
        err.message_chain().contains("injected failure"),
        "{}",
        err.message_chain()
    );
    // m1 committed; e1 rolled back (not marked processed); m2 never reached.
    assert_eq!(row(&pool, "m1").await.expect("m1").msg_data, "v0");
    assert_eq!(row(&pool, "m2").await, None);
    assert_eq!(count(&pool, "chat_processed_messages").await, 1);

    unbreak(&pool).await;
    let retry = handle(&state, event).await.expect("retry");
    assert_eq!(
        statuses(&retry),
        [Status::Duplicate, Status::Updated, Status::Inserted]
    );
    assert_eq!(row(&pool, "m1").await.expect("m1").msg_data, "v1");
    assert_eq!(count(&pool, "chat_data").await, 2);
}

/// `updated_at` of a row, in microseconds since the epoch.
async fn updated_at(pool: &PgPool, msg_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT (extract(epoch FROM updated_at) * 1000000)::bigint FROM chat_data WHERE msg_id = $1",
    )
    .bind(msg_id)
    .fetch_one(pool)
    .await
    .expect("updated_at")
}
