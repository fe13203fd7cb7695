//! SQLite backup placeholder.
