//! Names, sizes and vocabularies: `KvDtype`'s names and bit widths, the cache and
//! weight levels engines use, the conversions between them and, with the `serde`
//! feature, round trips through JSON as lower-case names.

use kvq::{CacheLevel, Error, KvDtype, WeightLevel};

fn config_msg(e: Error) -> String {
    match e {
        Error::InvalidConfig(m) => m,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn dtype_names_parse_and_print() {
    let cases = [
        ("f16", KvDtype::F16, "f16"),
        ("fp16", KvDtype::F16, "f16"),
        ("bf16", KvDtype::Bf16, "bf16"),
        ("int8", KvDtype::Int8, "int8"),
        ("fp8", KvDtype::Fp8E4M3, "fp8-e4m3"),
        ("fp8-e4m3", KvDtype::Fp8E4M3, "fp8-e4m3"),
        ("FP8-E5M2", KvDtype::Fp8E5M2, "fp8-e5m2"),
        ("int4", KvDtype::Int4 { group: 32 }, "int4"),
        ("int4:g32", KvDtype::Int4 { group: 32 }, "int4"),
        (" int4:g64 ", KvDtype::Int4 { group: 64 }, "int4:g64"),
    ];
    for (name, dtype, printed) in cases {
        assert_eq!(name.parse::<KvDtype>(), Ok(dtype), "{name}");
        assert_eq!(dtype.to_string(), printed);
    }
    for d in KvDtype::ALL {
        assert_eq!(d.to_string().parse::<KvDtype>(), Ok(d));
    }
    for bad in [
        "", "fp8-e3m4", "int3", "int4:g12", "int4:g0", "bfloat16", "q8",
    ] {
        assert!(
            matches!(bad.parse::<KvDtype>(), Err(Error::UnknownDtype(_))),
            "{bad}"
        );
    }
    for name in ["f16", "fp16", "bf16", "int8", "fp8", "fp8-e5m2", "int4:gN"] {
        assert!(KvDtype::NAMES.contains(name), "{name}");
    }
}

#[test]
fn dtype_sizes() {
    let d = 128;
    let bits: Vec<(u32, f64)> = KvDtype::ALL
        .iter()
        .map(|t| (t.nominal_bits(), t.bits_per_element(d)))
        .collect();
    assert_eq!(
        bits,
        [
            (16, 16.0),
            (16, 16.0),
            (8, 8.25),
            (8, 8.25),
            (8, 8.25),
            (4, 5.0)
        ]
    );
    assert_eq!(KvDtype::Int4 { group: 128 }.bits_per_element(d), 4.25);
    assert_eq!(KvDtype::Bf16.factor_vs_f16(d), 1.0);
    assert_eq!(KvDtype::Bf16.factor_vs_f32(d), 0.5);
    assert_eq!(KvDtype::Fp8E5M2.factor_vs_f16(d), 8.25 / 16.0);
    assert_eq!(KvDtype::Int4 { group: 32 }.factor_vs_f32(d), 5.0 / 32.0);
    assert_eq!(KvDtype::Fp8E4M3.nominal_factor_vs_f16(), 0.5);
    assert_eq!(KvDtype::Int4 { group: 64 }.nominal_factor_vs_f16(), 0.25);
}

#[test]
fn dtype_compactness_ties_within_a_width() {
    let ord: Vec<u8> = KvDtype::ALL.iter().map(KvDtype::compactness).collect();
    assert_eq!(ord, [0, 0, 1, 1, 1, 2]);
    assert!(ord.is_sorted());
    for d in KvDtype::ALL {
        // Less compact never means fewer bits.
        for e in KvDtype::ALL {
            if d.compactness() < e.compactness() {
                assert!(d.bits_per_element(128) > e.bits_per_element(128));
            }
        }
    }
}

#[test]
fn dtype_from_bits() {
    assert_eq!(KvDtype::from_bits(4), Ok(KvDtype::Int4 { group: 32 }));
    let m = config_msg(KvDtype::from_bits(8).unwrap_err());
    assert!(
        m.contains("8 bits") && m.contains("int8") && m.contains("fp8"),
        "{m}"
    );
    let m = config_msg(KvDtype::from_bits(16).unwrap_err());
    assert!(m.contains("f16") && m.contains("bf16"), "{m}");
    for bits in [0, 2, 3, 32] {
        let m = config_msg(KvDtype::from_bits(bits).unwrap_err());
        assert!(m.contains(&format!("{bits} bits")), "{m}");
    }
    for d in KvDtype::ALL {
        match KvDtype::from_bits(d.nominal_bits()) {
            Ok(e) => assert_eq!(e, d),
            Err(e) => assert!(config_msg(e).contains(&d.to_string()[..3]), "{d}"),
        }
    }
}

#[test]
fn dtype_pairs() {
    assert_eq!(
        KvDtype::parse_pair("int8/int4:g64"),
        Ok((KvDtype::Int8, KvDtype::Int4 { group: 64 }))
    );
    assert_eq!(
        KvDtype::parse_pair("fp8"),
        Ok((KvDtype::Fp8E4M3, KvDtype::Fp8E4M3))
    );
    assert!(KvDtype::parse_pair("int8/").is_err());
    assert!(KvDtype::parse_pair("int8/int4/f16").is_err());
}

#[test]
fn cache_levels() {
    let names: Vec<String> = CacheLevel::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["fp16", "q8", "fp8", "q4"]);
    for l in CacheLevel::ALL {
        assert_eq!(l.name().parse::<CacheLevel>(), Ok(l));
        assert_eq!(l.name().to_uppercase().parse::<CacheLevel>(), Ok(l));
        assert_eq!(KvDtype::from(l), l.dtype());
        assert_eq!(CacheLevel::try_from(l.dtype()), Ok(l));
        assert_eq!(l.memory_factor(), l.dtype().nominal_factor_vs_f16());
    }
    let factors: Vec<f64> = CacheLevel::ALL.iter().map(|l| l.memory_factor()).collect();
    assert_eq!(factors, [1.0, 0.5, 0.5, 0.25]);
    let ord: Vec<u8> = CacheLevel::ALL.iter().map(|l| l.compactness()).collect();
    assert_eq!(ord, [0, 1, 2, 3]);
    assert!(CacheLevel::Fp16 < CacheLevel::Q8 && CacheLevel::Q8 < CacheLevel::Fp8);
    assert!(CacheLevel::Fp8 < CacheLevel::Q4);

    // A policy stepping down under memory pressure, and back up.
    let mut down = vec![CacheLevel::Fp16];
    while let Some(next) = down.last().unwrap().next_more_compact() {
        down.push(next);
    }
    assert_eq!(down, CacheLevel::ALL);
    assert_eq!(CacheLevel::Q4.next_less_compact(), Some(CacheLevel::Fp8));
    assert_eq!(CacheLevel::Fp16.next_less_compact(), None);

    assert_eq!(CacheLevel::Q4.dtype(), KvDtype::Int4 { group: 32 });
    assert_eq!(CacheLevel::Fp8.dtype(), KvDtype::Fp8E4M3);
    assert_eq!(
        CacheLevel::try_from(KvDtype::Int4 { group: 128 }),
        Ok(CacheLevel::Q4)
    );
    for d in [KvDtype::Bf16, KvDtype::Fp8E5M2] {
        let m = config_msg(CacheLevel::try_from(d).unwrap_err());
        assert!(
            m.contains(&d.to_string()) && m.contains("no cache level"),
            "{m}"
        );
    }

    assert_eq!(CacheLevel::from_bits(16), Ok(CacheLevel::Fp16));
    assert_eq!(CacheLevel::from_bits(4), Ok(CacheLevel::Q4));
    let m = config_msg(CacheLevel::from_bits(8).unwrap_err());
    assert!(m.contains("q8") && m.contains("fp8"), "{m}");
    assert!(CacheLevel::from_bits(2).is_err());
    let m = config_msg("q2".parse::<CacheLevel>().unwrap_err());
    assert!(
        m.contains("\"q2\"") && m.contains("fp16, q8, fp8 or q4"),
        "{m}"
    );
}

#[test]
fn weight_levels() {
    let names: Vec<String> = WeightLevel::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["none", "float16", "bfloat16", "int8", "int4"]);
    let bits: Vec<u32> = WeightLevel::ALL
        .iter()
        .map(|l| l.bits_per_element())
        .collect();
    assert_eq!(bits, [32, 16, 16, 8, 4]);
    let reduction: Vec<f64> = WeightLevel::ALL
        .iter()
        .map(|l| l.reduction_vs_f32())
        .collect();
    assert_eq!(reduction, [1.0, 2.0, 2.0, 4.0, 8.0]);
    assert_eq!(WeightLevel::Int4.factor_vs_f32(), 0.125);
    let ord: Vec<u8> = WeightLevel::ALL.iter().map(|l| l.compactness()).collect();
    assert_eq!(ord, [0, 1, 1, 2, 3]);
    for l in WeightLevel::ALL {
        assert_eq!(l.name().parse::<WeightLevel>(), Ok(l));
        match KvDtype::try_from(l) {
            Ok(d) => {
                assert_eq!(WeightLevel::try_from(d), Ok(l));
                assert_eq!(d.nominal_bits(), l.bits_per_element());
            }
            Err(e) => {
                assert_eq!(l, WeightLevel::None);
                assert!(config_msg(e).contains("none"));
            }
        }
    }
    assert_eq!(WeightLevel::from_bits(8), Ok(WeightLevel::Int8));
    assert_eq!(WeightLevel::from_bits(4), Ok(WeightLevel::Int4));
    assert_eq!(WeightLevel::from_bits(32), Ok(WeightLevel::None));
    let m = config_msg(WeightLevel::from_bits(16).unwrap_err());
    assert!(m.contains("float16") && m.contains("bfloat16"), "{m}");
    assert!(WeightLevel::from_bits(6).is_err());
    for d in [KvDtype::Fp8E4M3, KvDtype::Fp8E5M2] {
        let m = config_msg(WeightLevel::try_from(d).unwrap_err());
        assert!(m.contains("no weight level"), "{m}");
    }
    assert!("fp16".parse::<WeightLevel>().is_err());
}

#[cfg(feature = "serde")]
mod serde_names {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct EngineConfig {
        cache_dtype: KvDtype,
        level: CacheLevel,
        weights: WeightLevel,
    }

    #[test]
    fn dtypes_round_trip_as_lower_case_names() {
        let mut all = KvDtype::ALL.to_vec();
        all.extend([KvDtype::Int4 { group: 8 }, KvDtype::Int4 { group: 128 }]);
        for d in all {
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{d}\""));
            assert_eq!(json, json.to_lowercase());
            assert_eq!(serde_json::from_str::<KvDtype>(&json).unwrap(), d);
        }
        // The engines' cache dtype names.
        for (name, d) in [
            ("fp16", KvDtype::F16),
            ("bf16", KvDtype::Bf16),
            ("int8", KvDtype::Int8),
            ("fp8", KvDtype::Fp8E4M3),
        ] {
            let json = format!("\"{name}\"");
            assert_eq!(serde_json::from_str::<KvDtype>(&json).unwrap(), d);
        }
        let e = serde_json::from_str::<KvDtype>("\"int3\"").unwrap_err();
        assert!(e.to_string().contains("int3"), "{e}");
        let e = serde_json::from_str::<KvDtype>("8").unwrap_err();
        assert!(e.to_string().contains("KV dtype name"), "{e}");
    }

    #[test]
    fn levels_round_trip_as_lower_case_names() {
        for l in CacheLevel::ALL {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(json, format!("\"{}\"", l.name()));
            assert_eq!(serde_json::from_str::<CacheLevel>(&json).unwrap(), l);
        }
        for l in WeightLevel::ALL {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(json, format!("\"{}\"", l.name()));
            assert_eq!(serde_json::from_str::<WeightLevel>(&json).unwrap(), l);
        }
        assert!(serde_json::from_str::<CacheLevel>("\"q3\"").is_err());
    }

    #[test]
    fn config_file_round_trip() {
        let c = EngineConfig {
            cache_dtype: KvDtype::Fp8E5M2,
            level: CacheLevel::Q8,
            weights: WeightLevel::Bfloat16,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"cache_dtype":"fp8-e5m2","level":"q8","weights":"bfloat16"}"#
        );
        assert_eq!(serde_json::from_str::<EngineConfig>(&json).unwrap(), c);
        let c: EngineConfig =
            serde_json::from_str(r#"{"cache_dtype":"fp8","level":"fp8","weights":"int4"}"#)
                .unwrap();
        assert_eq!(c.cache_dtype, CacheLevel::Fp8.dtype());
        assert_eq!(CacheLevel::try_from(c.cache_dtype), Ok(c.level));
    }
}
