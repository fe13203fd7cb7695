//! The store contract suite on every driver.

mod sqlite {
    stacyvm_store::store_contract_suite!(stacyvm_store::StoreDriver::Sqlite);
}

mod postgres {
    stacyvm_store::store_contract_suite!(stacyvm_store::StoreDriver::Postgres);
}
