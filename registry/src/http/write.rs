//! The preamble every admin write shared: the caller, the registry and the idempotency key
//! (extracted in that order), the admin check, then the JSON body, then the write on a
//! blocking thread, committed once per idempotency key. Also the admin listings filtered by
//! `?network=` and the lookups that answer "no such id".

use super::*;
use crate::model::Model;
use crate::plan::Planned;
use crate::service::RequestKey;
use serde::Serialize;
use std::collections::BTreeMap;

/// Extractor: an admin's write request. The admin check happens in its methods, first thing,
/// as it did in every handler (after the extractors, before the body is parsed).
#[derive(Debug, Clone)]
pub struct AdminWrite {
    /// Who asks (for the log lines).
    pub caller: Identity,
    reg: Shared,
    once: Once,
}

impl FromRequestParts<Shared> for AdminWrite {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, reg: &Shared) -> Result<Self, ApiError> {
        let Caller(caller) = Caller::from_request_parts(parts, reg).await?;
        let once = Once::from_request_parts(parts, reg).await?;
        Ok(AdminWrite {
            caller,
            reg: reg.clone(),
            once,
        })
    }
}

impl AdminWrite {
    fn admin(&self) -> Result<(), ApiError> {
        Caller(self.caller.clone()).admin()
    }

    async fn commit<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Registry, Option<&RequestKey>) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let once = self.once.clone();
        write(&self.reg, move |r| job(r, once.key())).await
    }

    /// `job` with the registry (for its clock, port reuse and fresh secrets) and the key.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Registry, Option<&RequestKey>) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.admin()?;
        self.commit(job).await
    }

    /// [`Self::run`] with the JSON body `S`, parsed after the admin check.
    pub(super) async fn run_body<S, T>(
        &self,
        body: &Bytes,
        job: impl FnOnce(&Registry, Option<&RequestKey>, S) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError>
    where
        S: DeserializeOwned + Send + 'static,
        T: Send + 'static,
    {
        self.admin()?;
        let spec: S = parse(body)?;
        self.commit(move |r, key| job(r, key, spec)).await
    }

    /// Commits what `plan` plans.
    pub(super) async fn plan<T>(
        &self,
        plan: impl Fn(&Model) -> Planned<T> + Send + 'static,
    ) -> Result<T, ApiError>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.run(move |r, key| r.write_once(key, plan)).await
    }

    /// Commits what `plan` plans from the JSON body `S`.
    pub(super) async fn plan_body<S, T>(
        &self,
        body: &Bytes,
        plan: impl Fn(&Model, &S) -> Planned<T> + Send + 'static,
    ) -> Result<T, ApiError>
    where
        S: DeserializeOwned + Send + 'static,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.run_body(body, move |r, key, spec: S| {
            r.write_once(key, |m| plan(m, &spec))
        })
        .await
    }
}

/// An admin's list of `items` (of the model), of one network if the query names one.
pub(super) fn admin_list<T: Clone>(
    c: &Caller,
    reg: &Shared,
    q: &HashMap<String, String>,
    items: impl Fn(&Model) -> &BTreeMap<String, T>,
    network_of: impl Fn(&T) -> &str,
) -> ApiResult<Vec<T>> {
    c.admin()?;
    let m = reg.read();
    let net = q.get("network");
    Ok(Json(
        items(&m)
            .values()
            .filter(|x| net.is_none_or(|n| network_of(x) == n))
            .cloned()
            .collect(),
    ))
}

/// `map[id]`, or `code` with "no `what` `id`".
pub(super) fn lookup<'m, T>(
    map: &'m BTreeMap<String, T>,
    id: &str,
    code: ErrorCode,
    what: &str,
) -> Result<&'m T, ApiError> {
    map.get(id)
        .ok_or_else(|| ApiError::new(code, format!("no {what} {id}")))
}
