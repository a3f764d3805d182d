package lastlayer.harness;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.SocketException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.HdfsConfiguration;
import org.apache.hadoop.hdfs.MiniDFSCluster;
import org.apache.hadoop.hdfs.server.datanode.DataNode;
import org.apache.hadoop.hdfs.server.namenode.NameNode;
import org.apache.hadoop.security.HadoopKerberosName;
import org.apache.hadoop.security.UserGroupInformation;

/**
 * A Kerberized MiniDFSCluster (one NameNode, one DataNode) for tests, driven by a line protocol.
 *
 * <p>Everything binds to 127.0.0.1. The KDC is external (an MIT krb5kdc started by
 * harness/securehdfs.py); the JVM must be started with {@code -Djava.security.krb5.conf=...}
 * (when it is missing, {@code <dir>/krb5.conf} is used).
 *
 * <p>Arguments: {@code --dir STATE} (required; expects {@code STATE/keytabs/server.keytab} holding
 * {@code hdfs/localhost} and {@code HTTP/localhost}), {@code --realm LOCAL}, {@code --nn-port 0},
 * {@code --http-port 0}, {@code --control-port -1} (a port on 127.0.0.1 serving the same line
 * protocol; 0 chooses a free one; -1 disables it), {@code --no-stdin} (do not read stdin: stop only
 * by the {@code stop} command or a signal), {@code --token-renew-ms 0} (the NameNode's delegation
 * token renew interval; 0: Hadoop's default, 1 day).
 *
 * <p>Protocol (one command a line, one answer line each): {@code ping} → {@code pong};
 * {@code restart-nn} → {@code ok restart-nn}; {@code map PRINCIPAL} → the short name Hadoop's
 * auth_to_local gives it, or {@code error MESSAGE}; {@code info} → the JSON line; {@code stop} →
 * {@code ok stop} after a clean shutdown. EOF on stdin also stops. Unknown commands and failures
 * answer {@code error MESSAGE}. On the control socket the first line must be
 * {@code auth TOKEN} (the token is read from the environment variable SECUREHDFS_CONTROL_TOKEN).
 */
public final class SecureHdfs {

  /** The walkthrough's five auth_to_local rules (realm LOCAL), and two for the YARN daemons. */
  static final String[] AUTH_TO_LOCAL_RULES = {
    "RULE:[2:$1@$0](^hdfs@LOCAL$)s/.*/hdfs/",
    "RULE:[1:$1@$0](^hdfs@LOCAL$)s/.*/hdfs/",
    "RULE:[1:$1@$0](^tensorflow@LOCAL$)s/.*/tensorflow/",
    "RULE:[1:$1@$0](^alice@LOCAL$)s/.*/alice/",
    "RULE:[1:$1@$0](^bob@LOCAL$)s/.*/bob/",
    // The YARN daemons (SecureYarn): the NameNode maps the ResourceManager, which renews tokens.
    "RULE:[2:$1@$0](^rm@LOCAL$)s/.*/yarn/",
    "RULE:[2:$1@$0](^nm@LOCAL$)s/.*/yarn/",
  };

  private final Path dir;
  private final String realm;
  private final int nnPortWanted;
  private final int httpPortWanted;
  /** dfs.namenode.delegation.token.renew-interval in ms; 0: Hadoop's default (1 day). */
  private long tokenRenewMs;
  private final PrintStream proto;
  private final Object lock = new Object();
  private final AtomicBoolean stopped = new AtomicBoolean(false);
  private final CountDownLatch done = new CountDownLatch(1);

  private Configuration conf;
  private MiniDFSCluster cluster;
  private ServerSocket control;
  private String controlToken;

  private SecureHdfs(Path dir, String realm, int nnPort, int httpPort, PrintStream proto) {
    this.dir = dir;
    this.realm = realm;
    this.nnPortWanted = nnPort;
    this.httpPortWanted = httpPort;
    this.proto = proto;
  }

  String hdfsPrincipal() {
    return "hdfs/localhost@" + realm;
  }

  String httpPrincipal() {
    return "HTTP/localhost@" + realm;
  }

  static String rules() {
    return String.join("\n", AUTH_TO_LOCAL_RULES);
  }

  /** The server-side configuration. */
  private Configuration serverConf() throws IOException {
    String keytab = dir.resolve("keytabs").resolve("server.keytab").toAbsolutePath().toString();
    if (!Files.isReadable(Paths.get(keytab))) {
      throw new IOException("server keytab not readable: " + keytab);
    }
    Path base = dir.resolve("minidfs").toAbsolutePath();
    Configuration c = new HdfsConfiguration();
    // Security: Kerberos authentication, service-level authorization, RPC authentication only.
    c.set("hadoop.security.authentication", "kerberos");
    c.setBoolean("hadoop.security.authorization", true);
    c.set("hadoop.rpc.protection", "authentication");
    c.set("hadoop.security.auth_to_local", rules());
    c.set("hadoop.security.auth_to_local.mechanism", "hadoop");
    // Service principals, spelled in full (no _HOST: it would resolve against 127.0.0.1).
    c.set("dfs.namenode.kerberos.principal", hdfsPrincipal());
    c.set("dfs.namenode.keytab.file", keytab);
    c.set("dfs.datanode.kerberos.principal", hdfsPrincipal());
    c.set("dfs.datanode.keytab.file", keytab);
    c.set("dfs.namenode.kerberos.internal.spnego.principal", httpPrincipal());
    c.set("dfs.web.authentication.kerberos.principal", httpPrincipal());
    c.set("dfs.web.authentication.kerberos.keytab", keytab);
    // Block access tokens + SASL on the data transfer protocol, on unprivileged ports.
    c.setBoolean("dfs.block.access.token.enable", true);
    c.set("dfs.data.transfer.protection", "authentication");
    c.setBoolean("ignore.secure.ports.for.testing", true);
    c.set("dfs.http.policy", "HTTP_ONLY");
    c.setInt("ipc.client.connect.max.retries.on.sasl", 10);
    // WebHDFS (and the other HTTP endpoints) behind SPNEGO.
    c.set("hadoop.http.authentication.type", "kerberos");
    c.set("hadoop.http.authentication.kerberos.principal", httpPrincipal());
    c.set("hadoop.http.authentication.kerberos.keytab", keytab);
    c.set("hadoop.http.authentication.kerberos.name.rules", rules());
    c.setBoolean("hadoop.http.authentication.simple.anonymous.allowed", false);
    c.set("hadoop.http.authentication.signer.secret.provider", "random");
    // Loopback only, small and quick.
    c.set("dfs.namenode.rpc-bind-host", "127.0.0.1");
    c.set("dfs.namenode.http-bind-host", "127.0.0.1");
    c.set("dfs.namenode.https-address", "127.0.0.1:0");
    c.set("dfs.datanode.https.address", "127.0.0.1:0");
    c.setBoolean("dfs.client.use.datanode.hostname", false);
    c.setInt("dfs.replication", 1);
    c.setInt("dfs.heartbeat.interval", 1);
    if (tokenRenewMs > 0) {
      c.setLong("dfs.namenode.delegation.token.renew-interval", tokenRenewMs);
    }
    c.setBoolean("dfs.permissions.enabled", true);
    c.set("hadoop.tmp.dir", base.resolve("tmp").toString());
    return c;
  }

  void start() throws Exception {
    conf = serverConf();
    UserGroupInformation.setConfiguration(conf);
    HadoopKerberosName.setConfiguration(conf);
    File base = dir.resolve("minidfs").toAbsolutePath().toFile();
    cluster = new MiniDFSCluster.Builder(conf, base)
        .numDataNodes(1)
        .nameNodePort(nnPortWanted)
        .nameNodeHttpPort(httpPortWanted)
        .format(true)
        .build();
    cluster.waitActive();
    writeClientConf();
  }

  int nnPort() {
    return cluster.getNameNode().getNameNodeAddress().getPort();
  }

  int httpPort() {
    return cluster.getNameNode().getHttpAddress().getPort();
  }

  /** The client configuration: core-site.xml and hdfs-site.xml in {@code <dir>/conf}. */
  void writeClientConf() throws IOException {
    Path confDir = dir.resolve("conf");
    Files.createDirectories(confDir);
    Configuration core = new Configuration(false);
    core.set("fs.defaultFS", "hdfs://127.0.0.1:" + nnPort());
    core.set("hadoop.security.authentication", "kerberos");
    core.set("hadoop.security.authorization", "true");
    core.set("hadoop.rpc.protection", "authentication");
    core.set("hadoop.security.auth_to_local", rules());
    core.set("hadoop.security.auth_to_local.mechanism", "hadoop");
    writeXml(core, confDir.resolve("core-site.xml"));

    Configuration hdfs = new Configuration(false);
    hdfs.set("dfs.namenode.rpc-address", "127.0.0.1:" + nnPort());
    hdfs.set("dfs.namenode.http-address", "127.0.0.1:" + httpPort());
    hdfs.set("dfs.namenode.kerberos.principal", hdfsPrincipal());
    hdfs.set("dfs.datanode.kerberos.principal", hdfsPrincipal());
    hdfs.set("dfs.web.authentication.kerberos.principal", httpPrincipal());
    hdfs.set("dfs.data.transfer.protection", "authentication");
    hdfs.set("dfs.block.access.token.enable", "true");
    hdfs.set("dfs.http.policy", "HTTP_ONLY");
    hdfs.set("dfs.webhdfs.enabled", "true");
    hdfs.set("dfs.client.use.datanode.hostname", "false");
    hdfs.set("dfs.replication", "1");
    // The nameservice `default`, so the walkthrough's hdfs://default/... URLs reach this NameNode.
    hdfs.set("dfs.nameservices", "default");
    hdfs.set("dfs.ha.namenodes.default", "nn1");
    hdfs.set("dfs.namenode.rpc-address.default.nn1", "127.0.0.1:" + nnPort());
    hdfs.set("dfs.namenode.http-address.default.nn1", "127.0.0.1:" + httpPort());
    hdfs.set("dfs.client.failover.proxy.provider.default",
        "org.apache.hadoop.hdfs.server.namenode.ha.ConfiguredFailoverProxyProvider");
    writeXml(hdfs, confDir.resolve("hdfs-site.xml"));
  }

  static void writeXml(Configuration c, Path target) throws IOException {
    Path tmp = target.resolveSibling(target.getFileName() + ".tmp");
    try (OutputStream out = Files.newOutputStream(tmp)) {
      c.writeXml(out);
    }
    Files.move(tmp, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
  }

  /** One JSON line describing the running cluster. */
  String info() {
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("realm", realm);
    m.put("namenode_rpc_port", nnPort());
    m.put("namenode_http_port", httpPort());
    if (!cluster.getDataNodes().isEmpty()) {
      DataNode dn = cluster.getDataNodes().get(0);
      m.put("datanode_xfer_port", dn.getXferPort());
      m.put("datanode_ipc_port", dn.getIpcPort());
      m.put("datanode_http_port", dn.getInfoPort());
    }
    m.put("control_port", control == null ? -1 : control.getLocalPort());
    m.put("fs_default_fs", "hdfs://127.0.0.1:" + nnPort());
    m.put("conf_dir", dir.resolve("conf").toAbsolutePath().toString());
    m.put("namenode_principal", hdfsPrincipal());
    m.put("http_principal", httpPrincipal());
    m.put("pid", ProcessHandle.current().pid());
    return json(m);
  }

  /** One JSON object (numbers and strings only) on one line. */
  static String json(Map<String, Object> m) {
    StringBuilder sb = new StringBuilder("{");
    boolean first = true;
    for (Map.Entry<String, Object> e : m.entrySet()) {
      if (!first) {
        sb.append(", ");
      }
      first = false;
      sb.append('"').append(e.getKey()).append("\": ");
      Object v = e.getValue();
      if (v instanceof Number) {
        sb.append(v);
      } else {
        sb.append('"').append(jsonEscape(String.valueOf(v))).append('"');
      }
    }
    return sb.append('}').toString();
  }

  static String jsonEscape(String s) {
    StringBuilder sb = new StringBuilder();
    for (char ch : s.toCharArray()) {
      if (ch == '"' || ch == '\\') {
        sb.append('\\').append(ch);
      } else if (ch < 0x20) {
        sb.append(String.format("\\u%04x", (int) ch));
      } else {
        sb.append(ch);
      }
    }
    return sb.toString();
  }

  static String oneLine(Throwable t) {
    String msg = t.getClass().getName() + ": " + t.getMessage();
    return msg.replace('\n', ' ').replace('\r', ' ');
  }

  /** Hadoop's own auth_to_local answer for a principal. */
  static String map(String principal) {
    try {
      return new HadoopKerberosName(principal).getShortName();
    } catch (Exception e) {
      return "error " + oneLine(e);
    }
  }

  /** Handles one protocol line; returns the answer line. Serialised. */
  String handle(String rawLine) {
    String line = rawLine.strip();
    String cmd = line;
    String arg = "";
    int sp = line.indexOf(' ');
    if (sp >= 0) {
      cmd = line.substring(0, sp);
      arg = line.substring(sp + 1).strip();
    }
    synchronized (lock) {
      if (stopped.get()) {
        return "error stopped";
      }
      switch (cmd) {
        case "ping":
          return "pong";
        case "info":
          return info();
        case "map":
          if (arg.isEmpty()) {
            return "error usage: map PRINCIPAL";
          }
          return map(arg);
        case "restart-nn":
          try {
            long t0 = System.nanoTime();
            cluster.restartNameNode(true);
            cluster.waitActive();
            writeClientConf();
            System.err.printf("NameNode restarted in %.1f s%n", (System.nanoTime() - t0) / 1e9);
            return "ok restart-nn";
          } catch (Exception e) {
            e.printStackTrace();
            return "error restart-nn " + oneLine(e);
          }
        case "stop":
          shutdown();
          return "ok stop";
        default:
          return "error unknown command: " + cmd;
      }
    }
  }

  /** Stops the control socket and the cluster; idempotent. */
  void shutdown() {
    if (!stopped.compareAndSet(false, true)) {
      return;
    }
    try {
      if (control != null) {
        control.close();
      }
    } catch (IOException e) {
      // closing anyway
    }
    try {
      if (cluster != null) {
        cluster.shutdown();
      }
    } catch (Exception e) {
      e.printStackTrace();
    }
  }

  void openControl(int port, String token) throws IOException {
    controlToken = token;
    control = new ServerSocket();
    control.setReuseAddress(true);
    control.bind(new InetSocketAddress(InetAddress.getByName("127.0.0.1"), port), 8);
    Thread t = new Thread(this::acceptLoop, "securehdfs-control");
    t.setDaemon(true);
    t.start();
  }

  private void acceptLoop() {
    while (!stopped.get()) {
      Socket s;
      try {
        s = control.accept();
      } catch (IOException e) {
        return;
      }
      Thread t = new Thread(() -> serve(s), "securehdfs-control-conn");
      t.setDaemon(true);
      t.start();
    }
  }

  private void serve(Socket s) {
    try (Socket sock = s;
        BufferedReader in = new BufferedReader(
            new InputStreamReader(sock.getInputStream(), StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(sock.getOutputStream(), true, StandardCharsets.UTF_8)) {
      sock.setSoTimeout(600_000);
      String first = in.readLine();
      if (first == null || !tokenMatches(first)) {
        out.println("error not authorised");
        return;
      }
      out.println("ok auth");
      String line;
      while ((line = in.readLine()) != null) {
        if (line.isBlank()) {
          continue;
        }
        String answer = handle(line);
        out.println(answer);
        if (line.strip().equals("stop")) {
          done.countDown();
          return;
        }
      }
    } catch (SocketException e) {
      // client went away
    } catch (IOException e) {
      System.err.println("control connection: " + oneLine(e));
    }
  }

  private boolean tokenMatches(String line) {
    if (controlToken == null || controlToken.isEmpty()) {
      return true;
    }
    String want = "auth " + controlToken;
    return MessageDigest.isEqual(
        want.getBytes(StandardCharsets.UTF_8), line.strip().getBytes(StandardCharsets.UTF_8));
  }

  private void stdinLoop() {
    try (BufferedReader in = new BufferedReader(
        new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
      String line;
      while ((line = in.readLine()) != null) {
        if (line.isBlank()) {
          continue;
        }
        String answer = handle(line);
        proto.println(answer);
        if (line.strip().equals("stop")) {
          break;
        }
      }
    } catch (IOException e) {
      System.err.println("stdin: " + oneLine(e));
    }
    done.countDown();
  }

  private static void usage(String why) {
    System.err.println("error " + why);
    System.err.println("usage: SecureHdfs --dir STATE [--realm LOCAL] [--nn-port 0] [--http-port 0]"
        + " [--control-port -1] [--no-stdin]");
    System.exit(64);
  }

  public static void main(String[] args) throws Exception {
    // The protocol owns the real stdout; anything else printing to System.out goes to stderr.
    PrintStream proto = new PrintStream(new FileOutputStream(FileDescriptor.out), true,
        StandardCharsets.UTF_8);
    System.setOut(System.err);

    String dirArg = null;
    String realm = "LOCAL";
    int nnPort = 0;
    int httpPort = 0;
    int controlPort = -1;
    long tokenRenewMs = 0;
    boolean readStdin = true;
    List<String> rest = new ArrayList<>(List.of(args));
    try {
      while (!rest.isEmpty()) {
        String a = rest.remove(0);
        switch (a) {
          case "--dir": dirArg = rest.remove(0); break;
          case "--realm": realm = rest.remove(0); break;
          case "--nn-port": nnPort = Integer.parseInt(rest.remove(0)); break;
          case "--http-port": httpPort = Integer.parseInt(rest.remove(0)); break;
          case "--control-port": controlPort = Integer.parseInt(rest.remove(0)); break;
          case "--no-stdin": readStdin = false; break;
          case "--token-renew-ms": tokenRenewMs = Long.parseLong(rest.remove(0)); break;
          default: usage("unknown argument " + a);
        }
      }
    } catch (IndexOutOfBoundsException | NumberFormatException e) {
      usage("bad arguments: " + oneLine(e));
    }
    if (dirArg == null) {
      usage("--dir is required");
    }
    Path dir = Paths.get(dirArg).toAbsolutePath();
    // Must be set before any Hadoop/Kerberos class reads it (KerberosName caches the realm).
    if (System.getProperty("java.security.krb5.conf") == null) {
      Path krb5 = dir.resolve("krb5.conf");
      if (!Files.isReadable(krb5)) {
        usage("no -Djava.security.krb5.conf and no " + krb5);
      }
      System.setProperty("java.security.krb5.conf", krb5.toString());
    }

    SecureHdfs h = new SecureHdfs(dir, realm, nnPort, httpPort, proto);
    h.tokenRenewMs = tokenRenewMs;
    Runtime.getRuntime().addShutdownHook(new Thread(h::shutdown, "securehdfs-shutdown"));
    long t0 = System.nanoTime();
    try {
      h.start();
      if (controlPort >= 0) {
        h.openControl(controlPort, System.getenv("SECUREHDFS_CONTROL_TOKEN"));
      }
    } catch (Throwable t) {
      StringWriter sw = new StringWriter();
      t.printStackTrace(new PrintWriter(sw));
      System.err.println(sw);
      proto.println("error start " + oneLine(t));
      h.shutdown();
      System.exit(2);
    }
    System.err.printf("Secure MiniDFSCluster up in %.1f s%n", (System.nanoTime() - t0) / 1e9);
    proto.println("Ready!");
    proto.println(h.info());

    if (readStdin) {
      Thread t = new Thread(h::stdinLoop, "securehdfs-stdin");
      t.setDaemon(true);
      t.start();
    }
    h.done.await();
    h.shutdown();
    System.err.println("SecureHdfs stopped");
    proto.flush();
    // Hadoop can leave non-daemon threads behind; the cluster is down, so leave now.
    TimeUnit.MILLISECONDS.sleep(50);
    System.exit(0);
  }
}
