//! The cluster DNS: Debian has no CoreDNS, so the harness answers
//! `<service>.<namespace>.svc.cluster.local` itself, from the API server's
//! Services (a ClusterIP, or a headless Service's ready endpoints), on the
//! node address behind the `kube-dns` Service that the kubelet gives pods
//! as their nameserver. Pods' resolvers expand the short forms (`details`,
//! `details.bookinfo`) with their search list.
//!
//! Names under `cluster.local` that do not exist get NXDOMAIN; any other
//! name gets SERVFAIL at once: this server never asks another one.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The cluster domain.
const DOMAIN: &str = "cluster.local.";
/// Answers are short-lived: Services come and go during tests.
const TTL: u32 = 5;

/// Options of the hidden `cargo xtask cluster dns`.
#[derive(clap::Args)]
pub struct Args {
    /// The API server's kubeconfig.
    #[arg(long)]
    kubeconfig: std::path::PathBuf,
    /// Where to answer (UDP and TCP).
    #[arg(long)]
    listen: SocketAddr,
}

/// The Services and Endpoints the answers come from, shared by the
/// watchers and the listeners.
type Zone = Arc<RwLock<Records>>;

#[derive(Default)]
struct Records {
    services: BTreeMap<(String, String), Service>,
    endpoints: BTreeMap<(String, String), Endpoints>,
}

impl Records {
    /// The A records of `<name>.<namespace>.svc.cluster.local`, or None
    /// when there is no such Service.
    fn lookup(&self, namespace: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
        let key = (namespace.to_owned(), name.to_owned());
        let service = self.services.get(&key)?;
        let spec = service.spec.as_ref()?;
        match spec.cluster_ip.as_deref() {
            Some("None") => {
                let ips = self
                    .endpoints
                    .get(&key)
                    .into_iter()
                    .flat_map(|e| e.subsets.iter().flatten())
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter_map(|a| a.ip.parse().ok())
                    .collect();
                Some(ips)
            }
            Some(ip) => Some(ip.parse().ok().into_iter().collect()),
            // ExternalName and friends: the name exists, with no A record.
            None => Some(Vec::new()),
        }
    }

    /// The answer to one question.
    fn answer(&self, query: &Query) -> (ResponseCode, Vec<Record>) {
        let name = query.name().to_lowercase();
        let Ok(domain) = Name::from_ascii(DOMAIN) else {
            return (ResponseCode::ServFail, Vec::new());
        };
        if !domain.zone_of(&name) {
            return (ResponseCode::ServFail, Vec::new());
        }
        let labels: Vec<String> = name
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let found = match labels.as_slice() {
            [service, namespace, "svc", "cluster", "local"] => self.lookup(namespace, service),
            // The zone and the namespaces exist, with no address.
            [_, "svc", "cluster", "local"] | ["svc", "cluster", "local"] | ["cluster", "local"] => {
                Some(Vec::new())
            }
            _ => None,
        };
        match found {
            None => (ResponseCode::NXDomain, Vec::new()),
            Some(ips) if query.query_type() == RecordType::A => {
                let records = ips
                    .into_iter()
                    .map(|ip| Record::from_rdata(query.name().clone(), TTL, RData::A(A(ip))))
                    .collect();
                (ResponseCode::NoError, records)
            }
            Some(_) => (ResponseCode::NoError, Vec::new()),
        }
    }
}

/// Answers one DNS message.
fn respond(zone: &Zone, request: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        response.metadata.response_code = ResponseCode::NotImp;
        response.add_queries(request.queries.clone());
        return response.to_vec().ok();
    }
    let query = &request.queries[0];
    let (code, answers) = match zone.read() {
        Ok(records) => records.answer(query),
        Err(_) => (ResponseCode::ServFail, Vec::new()),
    };
    response.metadata.response_code = code;
    // Negative answers carry the zone's SOA so resolvers cache them
    // briefly (RFC 2308).
    let negative =
        code == ResponseCode::NXDomain || (code == ResponseCode::NoError && answers.is_empty());
    if negative && let Some(soa) = soa() {
        response.add_authority(soa);
    }
    response.add_query(query.clone());
    response.add_answers(answers);
    response.to_vec().ok()
}

/// The zone's SOA record.
fn soa() -> Option<Record> {
    let domain = Name::from_ascii(DOMAIN).ok()?;
    let soa = SOA::new(
        Name::from_ascii("ns.dns.cluster.local.").ok()?,
        Name::from_ascii("hostmaster.cluster.local.").ok()?,
        1,
        7200,
        1800,
        86400,
        TTL,
    );
    Some(Record::from_rdata(domain, TTL, RData::SOA(soa)))
}

/// Runs the DNS server until killed.
pub fn serve(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&args.kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let client = kube::Client::try_from(config)?;
        let zone: Zone = Arc::default();
        let udp = tokio::net::UdpSocket::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on udp {}", args.listen))?;
        let tcp = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on tcp {}", args.listen))?;
        eprintln!(
            "dns: answering *.svc.cluster.local on {} (udp, tcp)",
            args.listen
        );
        let services = watch::<Service>(client.clone(), zone.clone(), |r| &mut r.services);
        let endpoints = watch::<Endpoints>(client, zone.clone(), |r| &mut r.endpoints);
        tokio::spawn(services);
        tokio::spawn(endpoints);
        tokio::spawn(serve_tcp(tcp, zone.clone()));
        let mut buf = vec![0u8; 4096];
        loop {
            let (len, peer) = udp.recv_from(&mut buf).await?;
            if let Some(reply) = respond(&zone, &buf[..len]) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    })
}

async fn serve_tcp(listener: tokio::net::TcpListener, zone: Zone) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            let result: std::io::Result<()> = async {
                loop {
                    let len = stream.read_u16().await? as usize;
                    let mut request = vec![0u8; len];
                    stream.read_exact(&mut request).await?;
                    let Some(reply) = respond(&zone, &request) else {
                        return Ok(());
                    };
                    stream.write_u16(reply.len() as u16).await?;
                    stream.write_all(&reply).await?;
                }
            }
            .await;
            drop(result);
        });
    }
}

/// Keeps one kind's table in step with the API server; a relist replaces
/// the table, so objects deleted while the watch was down disappear.
async fn watch<K>(
    client: kube::Client,
    zone: Zone,
    table: fn(&mut Records) -> &mut BTreeMap<(String, String), K>,
) where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let api: kube::Api<K> = kube::Api::all(client);
    let mut fresh = BTreeMap::new();
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let key = |o: &K| {
            let meta = o.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let Ok(mut records) = zone.write() else {
            return;
        };
        match event {
            Ok(watcher::Event::Apply(o)) => {
                table(&mut records).insert(key(&o), o);
            }
            Ok(watcher::Event::Delete(o)) => {
                table(&mut records).remove(&key(&o));
            }
            Ok(watcher::Event::Init) => fresh.clear(),
            Ok(watcher::Event::InitApply(o)) => {
                fresh.insert(key(&o), o);
            }
            Ok(watcher::Event::InitDone) => {
                *table(&mut records) = std::mem::take(&mut fresh);
            }
            Err(err) => eprintln!("dns: watch error (retrying): {err}"),
        }
    }
}

/// Asks `server` for the A record of `name` over UDP: `Ok(None)` when the
/// name exists without one or does not exist.
pub fn lookup(server: SocketAddr, name: &str) -> anyhow::Result<Option<Ipv4Addr>> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.send_to(&query.to_vec()?, server)?;
    let mut buf = [0u8; 4096];
    let (len, _) = socket.recv_from(&mut buf)?;
    let reply = Message::from_vec(&buf[..len])?;
    if reply.metadata.id != query.metadata.id {
        bail!("the DNS reply has another id");
    }
    Ok(reply.answers.iter().find_map(|r| match &r.data {
        RData::A(A(ip)) => Some(*ip),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, ServiceSpec};
    use kube::api::ObjectMeta;

    fn zone() -> Zone {
        let mut records = Records::default();
        let service = |name: &str, ip: &str| Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("bookinfo".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        records.services.insert(
            ("bookinfo".into(), "details".into()),
            service("details", "198.19.0.20"),
        );
        records
            .services
            .insert(("bookinfo".into(), "db".into()), service("db", "None"));
        records.endpoints.insert(
            ("bookinfo".into(), "db".into()),
            Endpoints {
                subsets: Some(vec![EndpointSubset {
                    addresses: Some(vec![EndpointAddress {
                        ip: "198.18.0.7".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        );
        Arc::new(RwLock::new(records))
    }

    fn ask(zone: &Zone, name: &str, kind: RecordType) -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        let reply = respond(zone, &query.to_vec().unwrap()).expect("a reply");
        Message::from_vec(&reply).unwrap()
    }

    fn addresses(reply: &Message) -> Vec<Ipv4Addr> {
        reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(A(ip)) => Some(*ip),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_service_resolves_to_its_cluster_ip() {
        let reply = ask(
            &zone(),
            "Details.bookinfo.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&reply), vec![Ipv4Addr::new(198, 19, 0, 20)]);
    }

    #[test]
    fn a_headless_service_resolves_to_its_endpoints() {
        let reply = ask(&zone(), "db.bookinfo.svc.cluster.local.", RecordType::A);
        assert_eq!(addresses(&reply), vec![Ipv4Addr::new(198, 18, 0, 7)]);
    }

    #[test]
    fn unknown_names_in_the_cluster_are_nxdomain_and_others_servfail() {
        let zone = zone();
        let reply = ask(&zone, "nope.bookinfo.svc.cluster.local.", RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            reply.authorities.len(),
            1,
            "a negative answer carries the SOA"
        );
        let reply = ask(
            &zone,
            "details.bookinfo.svc.cluster.local.bookinfo.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        let reply = ask(&zone, "example.com.", RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn an_aaaa_question_for_a_service_is_an_empty_answer() {
        let reply = ask(
            &zone(),
            "details.bookinfo.svc.cluster.local.",
            RecordType::AAAA,
        );
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
    }
}
