//! The chat page is served at `/` from the binary, with the SDK and its own script beside it.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use support::{Server, TestDb, config_json};

#[tokio::test]
async fn the_chat_page_and_its_assets_are_served() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let base = format!("http://{}", server.addr);

    let page = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.headers().contains_key("content-security-policy"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/static/centrifuge-5.8.0.js") && html.contains("/static/chat.js"));

    for (path, kind, needle) in [
        ("/static/chat.js", "text/javascript", "outgoing-chat"),
        ("/static/chat.css", "text/css", ".msg"),
        (
            "/static/centrifuge-5.8.0.js",
            "text/javascript",
            "globalThis.Centrifuge",
        ),
    ] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    let missing = reqwest::get(format!("{base}/static/nope.js"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    server.stop().await;
    db.drop_db().await;
}
