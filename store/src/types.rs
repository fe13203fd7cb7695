//! How [`Ts`] is stored on each driver: INTEGER microseconds on SQLite (so
//! comparisons are numeric, not lexicographic), `TIMESTAMPTZ` on Postgres (which
//! also keeps microseconds, so values round-trip exactly). Also the JSON-in-TEXT
//! helpers used by the row mappers.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteArgumentsBuffer, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Type};

use crate::model::Ts;

impl Type<Sqlite> for Ts {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for Ts {
    fn encode_by_ref(&self, buf: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
        <i64 as Encode<Sqlite>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Ts {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Ts(<i64 as Decode<Sqlite>>::decode(value)?))
    }
}

impl Type<Postgres> for Ts {
    fn type_info() -> PgTypeInfo {
        <chrono::DateTime<chrono::Utc> as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <chrono::DateTime<chrono::Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for Ts {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let t = self
            .to_chrono()
            .ok_or_else(|| format!("timestamp {} µs is out of range", self.0))?;
        <chrono::DateTime<chrono::Utc> as Encode<Postgres>>::encode_by_ref(&t, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Ts {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let t = <chrono::DateTime<chrono::Utc> as Decode<Postgres>>::decode(value)?;
        Ok(Ts(t.timestamp_micros()))
    }
}

/// Encodes a value for a JSON TEXT column. Maps and lists from `BTreeMap`/`Vec`
/// serialise deterministically, so every replica stores identical bytes.
pub(crate) fn to_json<T: Serialize>(v: &T) -> String {
    // Serialising plain maps, vectors and strings cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

/// Decodes a JSON TEXT column, naming the column on failure.
pub(crate) fn from_json<T: DeserializeOwned>(text: &str, column: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(e),
    })
}
