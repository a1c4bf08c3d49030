//! Export and import of the whole model (admin).

use super::*;
use vnp_registry_client::backup::{Export, ImportSummary};

pub(super) async fn export(c: Caller, State(reg): State<Shared>) -> ApiResult<Export> {
    c.admin()?;
    let out = reg.export()?;
    log::info!(
        "{} exported the registry ({} VMs, {} secrets sealed)",
        c.0,
        out.vms.len(),
        out.secrets.len()
    );
    Ok(Json(out))
}

pub(super) async fn import(
    c: Caller,
    State(reg): State<Shared>,
    body: Bytes,
) -> ApiResult<ImportSummary> {
    c.admin()?;
    let export: Export = parse(&body)?;
    let out = write(&reg, move |r| r.import(&export)).await?;
    log::info!("{} imported a registry export: {out:?}", c.0);
    Ok(Json(out))
}
