//! The keep set's cluster half (#21): every image a pod runs or a workload
//! would start, read from the API server with list calls only.
//!
//! Reads, across all namespaces (the ClusterRole `slipway-gc`): pods
//! (spec images, and `status.containerStatuses[].imageID`, the digest the
//! node actually runs), Deployments, ReplicaSets (a Deployment's rollback
//! history), StatefulSets, DaemonSets, Jobs and CronJobs (their pod
//! templates). Lists are paged (500 per call). A list that fails fails
//! the whole collection: a keep set with a kind missing would delete
//! images in use.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use kube::api::{Api, ListParams};
use kube::Client;
use serde::de::DeserializeOwned;

use super::plan::UseKind;
use super::GcError;

const PAGE: u32 = 500;

async fn list_all<K>(client: &Client, kind: &'static str) -> Result<Vec<K>, GcError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    // Bounded: 10,000 pages of 500 is five million objects.
    for _ in 0..10_000 {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.map_err(|source| GcError::List {
            kind,
            source: Box::new(source),
        })?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(out),
        }
    }
    Ok(out)
}

/// The images of a pod spec: containers, init and ephemeral containers.
pub fn spec_images(spec: &PodSpec) -> Vec<String> {
    let mut v: Vec<String> = spec
        .containers
        .iter()
        .filter_map(|c| c.image.clone())
        .collect();
    for c in spec.init_containers.iter().flatten() {
        v.extend(c.image.clone());
    }
    for c in spec.ephemeral_containers.iter().flatten() {
        v.extend(c.image.clone());
    }
    v
}

/// A pod's images: its spec's, and what its statuses say runs.
pub fn pod_images(p: &Pod) -> Vec<String> {
    let mut v = p.spec.as_ref().map(spec_images).unwrap_or_default();
    if let Some(s) = &p.status {
        for c in s
            .container_statuses
            .iter()
            .flatten()
            .chain(s.init_container_statuses.iter().flatten())
            .chain(s.ephemeral_container_statuses.iter().flatten())
        {
            v.push(c.image.clone());
            if !c.image_id.is_empty() {
                v.push(c.image_id.clone());
            }
        }
    }
    v
}

fn template(t: Option<&PodTemplateSpec>) -> Vec<String> {
    t.and_then(|t| t.spec.as_ref())
        .map(spec_images)
        .unwrap_or_default()
}

/// Every image in use, with where it was found.
pub async fn images_in_use(client: &Client) -> Result<Vec<(String, UseKind)>, GcError> {
    let mut out = Vec::new();
    let mut add = |v: Vec<String>, k: UseKind| out.extend(v.into_iter().map(|i| (i, k)));
    for p in list_all::<Pod>(client, "pods").await? {
        add(pod_images(&p), UseKind::Pod);
    }
    for d in list_all::<Deployment>(client, "deployments").await? {
        add(
            template(d.spec.as_ref().map(|s| &s.template)),
            UseKind::Template,
        );
    }
    for r in list_all::<ReplicaSet>(client, "replicasets").await? {
        add(
            template(r.spec.as_ref().and_then(|s| s.template.as_ref())),
            UseKind::Template,
        );
    }
    for s in list_all::<StatefulSet>(client, "statefulsets").await? {
        add(
            template(s.spec.as_ref().map(|s| &s.template)),
            UseKind::Template,
        );
    }
    for d in list_all::<DaemonSet>(client, "daemonsets").await? {
        add(
            template(d.spec.as_ref().map(|s| &s.template)),
            UseKind::Template,
        );
    }
    for j in list_all::<Job>(client, "jobs").await? {
        add(
            template(j.spec.as_ref().map(|s| &s.template)),
            UseKind::Template,
        );
    }
    for c in list_all::<CronJob>(client, "cronjobs").await? {
        add(
            template(
                c.spec
                    .as_ref()
                    .and_then(|s| s.job_template.spec.as_ref())
                    .map(|s| &s.template),
            ),
            UseKind::Template,
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_names_its_spec_images_and_the_digests_it_runs() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {
                "containers": [{"name": "c", "image": "reg:5000/app:v1"}],
                "initContainers": [{"name": "i", "image": "reg:5000/init@sha256:00"}]
            },
            "status": {
                "containerStatuses": [{
                    "name": "c", "image": "reg:5000/app:v1",
                    "imageID": "reg:5000/app@sha256:11",
                    "ready": true, "restartCount": 0
                }]
            }
        }))
        .unwrap();
        assert_eq!(
            pod_images(&p),
            [
                "reg:5000/app:v1",
                "reg:5000/init@sha256:00",
                "reg:5000/app:v1",
                "reg:5000/app@sha256:11"
            ]
        );
    }
}
