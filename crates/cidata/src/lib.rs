//! The NoCloud seed (user-data, meta-data, network-config) as an ISO9660 volume labelled cidata.
