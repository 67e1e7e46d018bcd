# summary.md of kvq's GPU check (tools/gpu-check/run): reads the bundle's MANIFEST,
# probe.log, tests.tsv, bench.jsonl, peer.jsonl, notes and, where nvidia-smi ran,
# gpu.txt; -v seconds=, failed= (failed steps) and quick= come from run.

# The value of "key" in a line of flat JSON.
function jget(line, key,    tag, i, v) {
    tag = "\"" key "\":"
    i = index(line, tag)
    if (!i) return ""
    v = substr(line, i + length(tag))
    if (substr(v, 1, 1) == "\"") {
        v = substr(v, 2)
        return substr(v, 1, index(v, "\"") - 1)
    }
    match(v, /^[^,}]*/)
    return substr(v, 1, RLENGTH)
}

function base(path,    n, parts) {
    n = split(path, parts, "/")
    return parts[n]
}

base(FILENAME) == "MANIFEST" && /^(commit|built|features):/ {
    manifest = manifest (manifest ? "; " : "") $0
    next
}
base(FILENAME) == "MANIFEST" { next }
base(FILENAME) == "gpu.txt" { gpu = $0; next }
base(FILENAME) == "notes" { notes = notes "- " $0 "\n"; next }
base(FILENAME) == "probe.log" && /^chosen:/ { sub(/^chosen: /, ""); chosen = $0; next }
base(FILENAME) == "tests.tsv" {
    split($0, f, "\t")
    tests = tests sprintf("| %s | %s | %s | %s |\n", f[1], f[2], f[3], f[4])
    next
}
base(FILENAME) == "bench.jsonl" && /^\{/ && jget($0, "variant") != "default" {
    variants = variants sprintf("| %s | %s | %s | %s / %s | %.1f | %.1f | %s |\n", jget($0, "variant"),
        jget($0, "batch"), jget($0, "context"), jget($0, "k_dtype"), jget($0, "v_dtype"),
        jget($0, "median_us"), jget($0, "gbps"),
        jget($0, "vs_f16") == "null" ? "-" : sprintf("%.2fx", jget($0, "vs_f16")))
    next
}
base(FILENAME) == "bench.jsonl" && /^\{/ {
    n++
    clock = jget($0, "clock")
    b = jget($0, "batch"); c = jget($0, "context")
    key[n] = b SUBSEP c
    row[n] = sprintf("| %s | %s | %s | %s / %s | %.1f | %.1f | %.1f | %.0f%% | %s |", jget($0, "backend"), b, c,
        jget($0, "k_dtype"), jget($0, "v_dtype"), jget($0, "median_us"), jget($0, "gbps"),
        jget($0, "roofline_gbps"), 100 * jget($0, "gbps") / jget($0, "roofline_gbps"),
        jget($0, "vs_f16") == "null" ? "-" : sprintf("%.2fx", jget($0, "vs_f16")))
    us[n] = jget($0, "median_us")
    a = jget($0, "backend") " " jget($0, "adapter")
    if (index(adapters, a) == 0) adapters = adapters (adapters ? "; " : "") a
    next
}
base(FILENAME) == "peer.jsonl" && /"peer":"copy"/ { copy = jget($0, "gbps"); next }
base(FILENAME) == "peer.jsonl" && /"peer":"torch-sdpa-f16"/ {
    k = jget($0, "batch") SUBSEP jget($0, "context")
    sdpa[k] = jget($0, "median_us")
    sdpa_name[k] = jget($0, "sdpa")
    sdpa_gbps[k] = jget($0, "gbps")
    next
}

END {
    print "# kvq GPU check"
    print ""
    print "| | |"
    print "| --- | --- |"
    print "| bundle | " manifest " |"
    print "| GPU (nvidia-smi) | " (gpu ? gpu : "none: no nvidia-smi") " |"
    print "| adapter chosen by the probe | " (chosen ? chosen : "none") " |"
    print "| settings | " (quick == "true" ? "--quick (CI)" : "full") " |"
    print "| run time | " seconds " s |"
    print "| result | " (failed ? "FAILED: " failed : "ok") " |"
    print ""
    if (notes) {
        printf "%s\n", notes
    }
    print "## Tests (CI=true: a missing adapter fails)"
    print ""
    print "| binary | result | tests passed | seconds |"
    print "| --- | --- | --- | --- |"
    printf "%s", tests
    print ""
    print "## Decode attention: 32 q / 8 kv heads, D 128 (" adapters ")"
    print ""
    print "µs: median " (clock == "device" ? "device time of the kernels (timestamp queries)" : "wall time from submit to completion") "; GB/s: K+V bytes read over it;"
    print "roofline: kvq's streaming read of as many bytes in the same rounds; vs f16: median"
    print "of each round's ratio to F16. SDPA: PyTorch's f16 scaled_dot_product_attention on"
    print "the same shapes, fastest backend, timed over CUDA graphs of ten calls, K/V copies rotated past L2."
    print ""
    print "| backend | batch | context | K / V | µs | GB/s | roofline GB/s | roofline % | vs f16 | SDPA f16 µs | µs / SDPA |"
    print "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for (i = 1; i <= n; i++) {
        if (key[i] in sdpa)
            printf "%s %.1f (%s) | %.2fx |\n", row[i], sdpa[key[i]], sdpa_name[key[i]], us[i] / sdpa[key[i]]
        else
            printf "%s - | - |\n", row[i]
    }
    if (variants) {
        print ""
        print "## attention.wgsl variants (bench options)"
        print ""
        print "| options | batch | context | K / V | µs | GB/s | vs f16 |"
        print "| --- | --- | --- | --- | --- | --- | --- |"
        printf "%s", variants
    }
    print ""
    if (copy)
        print "Device copy through PyTorch: " copy " GB/s (bytes read + written)."
    else
        print "No PyTorch peer here (see check.log)."
}
