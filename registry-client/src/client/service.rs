//! The load-balanced service endpoints (issue #10): `/v1/services`.

use super::{path_seg, RegistryClient};
use crate::api::*;
use crate::error::ClientError;

impl RegistryClient {
    /// Creates a load-balanced service (admin).
    pub fn create_service(&self, spec: &ServiceSpec) -> Result<Service, ClientError> {
        self.post("/v1/services", spec)
    }
    /// Lists services, optionally of one network (admin).
    pub fn list_services(&self, network: Option<&str>) -> Result<Vec<Service>, ClientError> {
        match network {
            Some(n) => self.get(&format!("/v1/services?network={}", path_seg(n))),
            None => self.get("/v1/services"),
        }
    }
    /// One service with its resolved pool (admin).
    pub fn get_service(&self, id: &str) -> Result<ServiceStatus, ClientError> {
        self.get(&format!("/v1/services/{}", path_seg(id)))
    }
    /// Removes a service (admin).
    pub fn delete_service(&self, id: &str) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/services/{}", path_seg(id)))
    }
    /// Adds a pool entry, or sets the weight of the entry with the same selector (admin).
    pub fn add_service_member(
        &self,
        id: &str,
        member: &MemberSpec,
    ) -> Result<Service, ClientError> {
        self.post(&format!("/v1/services/{}/members", path_seg(id)), member)
    }
    /// Reports gateway `id`'s view of its services' members (that gateway only).
    pub fn report_health(
        &self,
        id: &str,
        report: &HealthReport,
    ) -> Result<HealthView, ClientError> {
        self.put(&format!("/v1/gateways/{}/health", path_seg(id)), report)
    }
    /// Removes the pool entry selecting VM `vm` or tag `tag` (admin).
    pub fn remove_service_member(
        &self,
        id: &str,
        vm: Option<&str>,
        tag: Option<&str>,
    ) -> Result<Service, ClientError> {
        let query = match (vm, tag) {
            (Some(v), _) => format!("vm={}", path_seg(v)),
            (None, Some(t)) => format!("tag={}", path_seg(t)),
            (None, None) => String::new(),
        };
        self.delete(&format!("/v1/services/{}/members?{query}", path_seg(id)))
    }
}
