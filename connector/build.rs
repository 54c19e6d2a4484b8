//! Rebuilds the crate when a migration changes: `sqlx::migrate!` (in `db/mod.rs`) embeds the files of
//! `migrations/` at compile time, and cargo does not know that on its own.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
